"""The LoRA plan and its exact numbers.

`count(tree, plan)` is pure arithmetic on the module tree, cheap enough to run on every slider move. It
reproduces what PEFT itself reports through `get_nb_trainable_parameters()` for the same config: LoRA A/B
matrices, DoRA magnitude vectors, trainable biases and full copies of `modules_to_save` (PEFT counts both the
original and the copy in its total). `to_peft_config(plan, tree)` is the one place that builds a LoraConfig
(adapters/folder.py reads the plan of a saved adapter back).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from studio.core.errors import PlanError, did_you_mean
from studio.core.model.adapter_keys import lora_keys, saved_key
from studio.core.model.inventory import DTYPE_BYTES, SEQ_CLS_HEAD_NAMES, ModuleTree

Variant = Literal["lora", "rslora", "dora"]
BiasMode = Literal["none", "all", "lora_only"]
InitMethod = Literal["default", "gaussian", "pissa", "olora"]
VARIANTS = ("lora", "rslora", "dora")
BIAS_MODES = ("none", "all", "lora_only")
INIT_METHODS = ("default", "gaussian", "pissa", "olora")
ADAPTER_DTYPE = "float32"  # PEFT keeps adapter weights in float32 (autocast_adapter_dtype) on any base dtype


@dataclass(frozen=True)
class LoraPlan:
    """What to adapt and how. Module names are full names from the module tree."""

    targets: tuple[str, ...] = field(metadata={"help": (
        "The modules to adapt: a preset (attention, mlp, all-linear, peft-default) or comma-separated module names, "
        "leaf names (q_proj), globs (model.layers.1*.mlp.*) or re:REGEX; a plan holds the full names they select")})
    rank: int = 8
    alpha: float = 16.0
    rank_overrides: Mapping[str, int] = field(default_factory=dict)
    alpha_overrides: Mapping[str, float] = field(default_factory=dict)
    dropout: float = 0.05
    bias: BiasMode = "none"
    variant: Variant = field(default="lora", metadata={"help": (
        "lora, rslora (alpha/√r scaling) or dora (weight-decomposed: a magnitude and a direction)")})
    init: InitMethod = "default"
    modules_to_save: tuple[str, ...] = ()

    def rank_of(self, name: str) -> int:
        return int(self.rank_overrides.get(name, self.rank))

    def alpha_of(self, name: str) -> float:
        return float(self.alpha_overrides.get(name, self.alpha))

    def scaling_of(self, name: str) -> float:
        """alpha/r, or alpha/sqrt(r) for rsLoRA: the factor in ΔW = scaling·B·A."""
        r = self.rank_of(name)
        return self.alpha_of(name) / (math.sqrt(r) if self.variant == "rslora" else r)

    def to_dict(self) -> dict[str, Any]:
        return {
            "targets": list(self.targets),
            "rank": self.rank,
            "alpha": self.alpha,
            "rank_overrides": dict(self.rank_overrides),
            "alpha_overrides": dict(self.alpha_overrides),
            "dropout": self.dropout,
            "bias": self.bias,
            "variant": self.variant,
            "init": self.init,
            "modules_to_save": list(self.modules_to_save),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoraPlan":
        """A plan from its fields as a run file holds them; PlanError naming the field that is wrong."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(str(key) for key in set(data) - known)
        if unknown:
            hint = did_you_mean(unknown[0], known) or f" (known: {', '.join(sorted(known))})"
            raise PlanError(f"unknown plan field `{unknown[0]}`{hint}")
        values = dict(data)
        for key in ("targets", "modules_to_save"):
            if key in values:
                values[key] = _names(key, values[key])
        for key, kind in (("rank_overrides", int), ("alpha_overrides", float)):
            if key in values:
                overrides = values[key] or {}
                if not isinstance(overrides, Mapping):
                    raise PlanError(f"plan.{key} must map module names to numbers, got {overrides!r}")
                values[key] = {str(name): _plan_number(f"plan.{key}[{name}]", v, kind) for name, v in overrides.items()}
        for key, kind in (("rank", int), ("alpha", float), ("dropout", float)):
            if key in values:
                values[key] = _plan_number(f"plan.{key}", values[key], kind)
        for key in ("bias", "variant", "init"):
            if key in values and not isinstance(values[key], str):
                raise PlanError(f"plan.{key} must be text, got {values[key]!r}")
        plan = cls(**values)
        check_values(plan)
        return plan


@dataclass(frozen=True)
class PlanCounts:
    trainable: int  # equals PEFT's get_nb_trainable_parameters()[0]
    total: int  # equals PEFT's get_nb_trainable_parameters()[1]
    lora: int  # A and B matrices
    dora: int  # magnitude vectors
    bias: int  # base biases made trainable
    saved_modules: int  # full trainable copies (modules_to_save)
    adapter_bytes: int  # size of the adapter's safetensors file as PEFT writes it
    modules: int  # number of adapted modules

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "trainable": self.trainable,
            "total": self.total,
            "share": self.share,
            "adapter_bytes": self.adapter_bytes,
            "lora": self.lora,
            "dora": self.dora,
            "bias": self.bias,
            "saved_modules": self.saved_modules,
            "modules": self.modules,
        }


def effective_modules_to_save(tree: ModuleTree, plan: LoraPlan) -> list[str]:
    """The patterns PEFT will use: the plan's own plus, for classification, the head names PEFT adds."""
    names = list(plan.modules_to_save)
    if tree.task == "seq-cls":
        names += [n for n in SEQ_CLS_HEAD_NAMES if n not in names]
    return names


def _names(key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise PlanError(f"plan.{key} must be a name or a list of names, got {value!r}")
    return tuple(value)


def _plan_number(where: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PlanError(f"{where} must be a {'whole ' if kind is int else ''}number, got {value!r}")
    if kind is int and not float(value).is_integer():
        raise PlanError(f"{where} must be a whole number, got {value!r}")
    return kind(value)


def check_values(plan: LoraPlan) -> None:
    """The checks that need no model: rank, alpha, dropout and the named choices. PlanError when one is wrong."""
    if plan.variant not in VARIANTS:
        raise PlanError(f"unknown variant {plan.variant!r}{did_you_mean(plan.variant, VARIANTS)} "
                        f"(use one of {', '.join(VARIANTS)})")
    if plan.bias not in BIAS_MODES:
        raise PlanError(f"unknown bias mode {plan.bias!r}: use one of {', '.join(BIAS_MODES)}")
    if plan.init not in INIT_METHODS:
        raise PlanError(f"unknown init {plan.init!r}: use one of {', '.join(INIT_METHODS)}")
    if not 0.0 <= plan.dropout < 1.0:
        raise PlanError(f"dropout must be in [0, 1), got {plan.dropout}")
    for where, rank in [("rank", plan.rank), *((f"the rank of {n}", r) for n, r in plan.rank_overrides.items())]:
        if rank < 1:
            raise PlanError(f"{where} must be at least 1, got {rank}")
    for where, alpha in [("alpha", plan.alpha), *((f"the alpha of {n}", a) for n, a in plan.alpha_overrides.items())]:
        if not alpha > 0:
            raise PlanError(f"{where} must be positive, got {alpha:g}")


def validate(tree: ModuleTree, plan: LoraPlan) -> None:
    """Raise PlanError with an actionable message when PEFT could not build this plan or it makes no sense."""
    if not plan.targets:
        raise PlanError("no target modules selected: tick at least one layer or pick a preset")
    check_values(plan)
    for name in list(plan.rank_overrides) + list(plan.alpha_overrides):
        if name not in plan.targets:
            raise PlanError(f"an override is set for {name}, which is not a target")
    for name in plan.targets:
        if name not in tree:
            raise PlanError(f"{name} is not a module of this model")
        info = tree[name]
        if not info.targetable:
            raise PlanError(f"cannot target {name}: {info.why_not}")
        r = plan.rank_of(name)
        smallest = min(info.in_features or 0, info.out_features or 0)
        if r > smallest:
            raise PlanError(
                f"rank {r} is larger than {name} ({info.shape}): use a rank of at most {smallest} for it"
            )


def count(tree: ModuleTree, plan: LoraPlan) -> PlanCounts:
    """Exact trainable / total parameters and adapter file size for `plan` on `tree` (no torch involved)."""
    saved_patterns = effective_modules_to_save(tree, plan)
    saved = _saved_roots(tree, saved_patterns)
    saved_set = set(saved)
    excluded = _excluded_by_saved(tree, saved_patterns)
    tensors: list[tuple[str, str, tuple[int, ...]]] = []  # (key in the file, dtype, shape) for the file size
    lora = dora = 0
    adapted = [n for n in plan.targets if n not in excluded]
    for name in adapted:
        info = tree[name]
        r = plan.rank_of(name)
        n_in, n_out = int(info.in_features or 0), int(info.out_features or 0)
        a, b = r * n_in, n_out * r
        lora += a + b
        a_key, b_key = lora_keys(name, embedding=info.kind == "embedding")
        tensors += [(a_key, ADAPTER_DTYPE, (r, n_in)), (b_key, ADAPTER_DTYPE, (n_out, r))]
        if plan.variant == "dora":
            dora += n_out
            tensors.append((saved_key(f"{name}.lora_magnitude_vector"), ADAPTER_DTYPE, (n_out,)))

    bias = 0
    adapted_set = set(adapted)
    with_trainable_bias = adapted if plan.bias == "lora_only" else tree.modules if plan.bias == "all" else []
    for name in with_trainable_bias:
        info = tree[name]
        if info.bias_params and not _inside(name, saved_set):
            bias += info.bias_params
            wrapped = ".base_layer" if name in adapted_set else ""
            tensors.append((saved_key(f"{name}{wrapped}.bias"), info.dtype, (info.bias_params,)))

    saved_params = 0
    for root in saved:
        for sub in [root, *tree.descendants(root)]:
            saved_params += tree[sub].held_params
            tensors += _saved_tensors(tree, sub)
            if plan.bias == "all" and tree[sub].bias_params:
                # PEFT's bias="all" filter also picks up the wrapper's own two copies of a saved module's bias
                rest = sub[len(root):]
                for copy in ("modules_to_save", "original_module"):
                    key = saved_key(f"{root}.{copy}{rest}.bias")
                    tensors.append((key, tree[sub].dtype, (tree[sub].bias_params,)))
    trainable = lora + dora + bias + saved_params
    total = tree.total_params + lora + dora + saved_params
    return PlanCounts(
        trainable=trainable,
        total=total,
        lora=lora,
        dora=dora,
        bias=bias,
        saved_modules=saved_params,
        adapter_bytes=_safetensors_size(tensors),
        modules=len(adapted),
    )


def _inside(name: str, roots: set[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _saved_roots(tree: ModuleTree, patterns: list[str]) -> list[str]:
    """Modules PEFT wraps in ModulesToSaveWrapper: names ending with a pattern (plain suffix, as PEFT does)."""
    roots: list[str] = []
    for name in tree.modules:
        if name and any(name.endswith(p) for p in patterns) and not _inside(name, set(roots)):
            roots.append(name)
    return roots


def _excluded_by_saved(tree: ModuleTree, patterns: list[str]) -> set[str]:
    """LoRA never goes inside a module that is saved in full (PEFT's guard against conflicting wrappers)."""
    if not patterns:
        return set()
    regexes = [re.compile(rf"(^|.*\.){p}($|\..*)") for p in patterns]
    return {n for n in tree.modules if n and any(rx.match(n) for rx in regexes)}


def _saved_tensors(tree: ModuleTree, sub: str) -> list[tuple[str, str, tuple[int, ...]]]:
    info = tree[sub]
    key = saved_key(sub)
    out = []
    if info.bias_params:
        out.append((f"{key}.bias", info.dtype, (info.bias_params,)))
    if info.weight_shape:
        out.append((f"{key}.weight", info.dtype, info.weight_shape))
    return out


# safetensors writes tensors sorted by dtype (larger alignment first) then by name
_DTYPE_CODES = {"float64": "F64", "float32": "F32", "bfloat16": "BF16", "float16": "F16", "int8": "I8", "uint8": "U8"}
_DTYPE_ORDER = {"F64": 0, "F32": 1, "BF16": 2, "F16": 3, "I8": 4, "U8": 5}


def _safetensors_size(tensors: list[tuple[str, str, tuple[int, ...]]]) -> int:
    """Exact byte size of a safetensors file holding these tensors with PEFT's {"format": "pt"} header.

    The header is compact JSON whose length depends on every key, shape and offset. Its length is added up
    field by field, in the writer's tensor order, rather than by building the JSON: this runs on every slider
    move, over a thousand tensors on a 70B plan.
    """
    if not tensors:
        return 0
    # per tensor: ,"KEY":{"dtype":"CODE","shape":[DIMS],"data_offsets":[START,END]}
    fixed = len(',"":{"dtype":"","shape":[],"data_offsets":[,]}')
    ordered = sorted(tensors, key=lambda t: (_DTYPE_ORDER.get(_DTYPE_CODES.get(t[1], "F32"), 9), t[0]))
    length = len('{"__metadata__":{"format":"pt"}}')
    offset = 0
    for key, dtype, shape in ordered:
        code = _DTYPE_CODES.get(dtype or ADAPTER_DTYPE, "F32")
        size = math.prod(shape) * DTYPE_BYTES.get(dtype or ADAPTER_DTYPE, 4)
        dims = sum(len(str(d)) for d in shape) + max(len(shape) - 1, 0)
        length += fixed + len(key) + len(code) + dims + len(str(offset)) + len(str(offset + size))
        offset += size
    length += (8 - length % 8) % 8
    return 8 + length + offset


def to_peft_config(plan: LoraPlan, tree: ModuleTree) -> Any:
    """The single place that turns a plan into PEFT's LoraConfig."""
    from peft import LoraConfig, TaskType

    validate(tree, plan)
    init: Any = True if plan.init == "default" else plan.init
    kwargs: dict[str, Any] = {
        "r": plan.rank,
        "lora_alpha": plan.alpha,
        "lora_dropout": plan.dropout,
        "bias": plan.bias,
        "target_modules": compact_targets(tree, plan.targets),
        "use_rslora": plan.variant == "rslora",
        "use_dora": plan.variant == "dora",
        "init_lora_weights": init,
        "task_type": TaskType.SEQ_CLS if tree.task == "seq-cls" else TaskType.CAUSAL_LM,
    }
    if plan.rank_overrides:
        kwargs["rank_pattern"] = {_anchored(n): int(r) for n, r in plan.rank_overrides.items()}
    if plan.alpha_overrides:
        kwargs["alpha_pattern"] = {_anchored(n): float(a) for n, a in plan.alpha_overrides.items()}
    if plan.modules_to_save:
        kwargs["modules_to_save"] = list(plan.modules_to_save)
    return LoraConfig(**kwargs)


def _anchored(name: str) -> str:
    """A rank_pattern key that matches exactly this module (PEFT matches keys as `(.*\\.)?key$`)."""
    return re.escape(name)


def compact_targets(tree: ModuleTree, targets: tuple[str, ...] | list[str]) -> list[str]:
    """PEFT target_modules for exactly `targets`: a leaf name (`q_proj`) when every module PEFT would match
    with it is selected, the full name otherwise. Readable configs, same modules."""
    chosen = set(targets)
    by_leaf: dict[str, list[str]] = {}
    for name in tree.modules:
        if name:
            by_leaf.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    out: list[str] = []
    for leaf, names in by_leaf.items():
        picked = [n for n in names if n in chosen]
        if not picked:
            continue
        if len(picked) == len(names):
            out.append(leaf)
        else:
            out.extend(picked)
    return sorted(out)

