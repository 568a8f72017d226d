"""The module tree of a model: what each named module is, its shape, its parameters, and whether LoRA can
target it. Plain data built once per model; the GUI's tree model wraps it and the plan counts over it.

Presets come from the model's own structure (which modules sit inside an attention block, which inside the
repeated blocks but outside attention), not from a table per architecture, except `peft-default`, which is
PEFT's own per-family table.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

from studio.core.errors import PlanError

ModuleKind = Literal["linear", "conv1d", "embedding", "container", "other"]
TARGETABLE_KINDS = ("linear", "conv1d", "embedding")
SEQ_CLS_HEAD_NAMES = ("score", "classifier")  # what PEFT adds to modules_to_save for classification
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1}
_ATTENTION_WORDS = re.compile(r"attn|attention", re.IGNORECASE)


@dataclass(frozen=True)
class ModuleInfo:
    name: str  # qualified name as in model.named_modules(); "" is the root
    class_name: str
    kind: ModuleKind
    in_features: int | None  # embeddings: number of embeddings
    out_features: int | None  # embeddings: embedding dimension
    own_params: int  # parameters held directly by this module (a tied weight counts where first seen)
    held_params: int  # parameters held directly, a tied weight counted here too (what a full copy holds)
    total_params: int  # with all descendants, each parameter once
    bias_params: int  # size of a directly held bias, 0 when there is none
    weight_shape: tuple[int, ...]  # shape of a directly held `weight`, () when there is none
    dtype: str  # dtype of the module's weight, e.g. "float32"
    targetable: bool
    why_not: str  # why it is not targetable; "" when it is
    is_output_head: bool
    is_classifier_head: bool
    in_attention: bool
    block_index: int | None  # index in the outermost repeated block list ("layers.7" -> 7)
    pattern: str  # the name with block indices replaced by "*": groups "q_proj in all layers"

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def shape(self) -> str:
        if self.in_features is None or self.out_features is None:
            return ""
        if self.kind == "embedding":
            return f"{self.in_features}×{self.out_features}"
        return f"{self.in_features}→{self.out_features}"


@dataclass
class ModuleTree:
    modules: dict[str, ModuleInfo]  # in named_modules() order, root first
    children: dict[str, list[str]]
    total_params: int  # every parameter once (tied weights once), as PEFT and named_parameters() count
    model_type: str
    architecture: str
    task: str
    output_head: str | None
    classifier_head: str | None
    _targetable: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._targetable = [n for n, m in self.modules.items() if m.targetable]

    @property
    def targetable(self) -> list[str]:
        return self._targetable

    def __getitem__(self, name: str) -> ModuleInfo:
        return self.modules[name]

    def __contains__(self, name: str) -> bool:
        return name in self.modules

    def descendants(self, name: str) -> Iterable[str]:
        """Names below `name` (not `name` itself), depth first."""
        stack = list(reversed(self.children.get(name, [])))
        while stack:
            child = stack.pop()
            yield child
            stack.extend(reversed(self.children.get(child, [])))


def build(model: Any, task: str = "causal-lm") -> ModuleTree:
    """Describe every named module of `model` (a torch module, on any device including meta)."""
    named = list(model.named_modules())
    owner_params: dict[str, int] = {name: 0 for name, _ in named}
    module_names = set(owner_params)
    for pname, param in model.named_parameters():  # deduplicated: a tied weight appears once
        owner = pname.rsplit(".", 1)[0] if "." in pname else ""
        while owner not in module_names:
            owner = owner.rsplit(".", 1)[0] if "." in owner else ""
        owner_params[owner] += _true_numel(param)

    output_head = _name_of(model, _call_or_none(model, "get_output_embeddings"), named)
    classifier_head = None
    if output_head is None:
        for head in SEQ_CLS_HEAD_NAMES:
            if isinstance(getattr(model, head, None), _torch_module()):
                classifier_head = head
                break
    attention_names = {name for name, mod in named if name and _is_attention(name, mod)}
    block_lists = _block_lists(named)

    modules: dict[str, ModuleInfo] = {}
    children: dict[str, list[str]] = {name: [] for name, _ in named}
    totals = dict(owner_params)
    for name, _ in reversed(named):  # children come after parents in named_modules: sum bottom-up
        if name:
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            totals[parent] = totals.get(parent, 0) + totals[name]
            children[parent].insert(0, name)
    for name, mod in named:
        kind, n_in, n_out = _kind_and_shape(mod)
        is_head = name == output_head
        is_cls = classifier_head is not None and (name == classifier_head or name.startswith(classifier_head + "."))
        targetable, why_not = kind in TARGETABLE_KINDS, ""
        if not targetable:
            why_not = _why_not(kind, mod)
        elif is_cls:
            targetable, why_not = False, "classification head: trained in full (modules_to_save), not through LoRA"
        bias = getattr(mod, "bias", None)
        weight = getattr(mod, "weight", None)
        modules[name] = ModuleInfo(
            name=name,
            class_name=type(mod).__name__,
            kind=kind,
            in_features=n_in,
            out_features=n_out,
            own_params=owner_params[name],
            held_params=sum(_true_numel(p) for p in mod.parameters(recurse=False)),
            total_params=totals[name],
            bias_params=_true_numel(bias) if _is_tensor(bias) else 0,
            weight_shape=tuple(int(d) for d in weight.shape) if _is_tensor(weight) else (),
            dtype=str(weight.dtype).replace("torch.", "") if _is_tensor(weight) else "",
            targetable=targetable,
            why_not=why_not,
            is_output_head=is_head,
            is_classifier_head=is_cls,
            in_attention=any(name == a or name.startswith(a + ".") for a in attention_names),
            block_index=_block_index(name, block_lists),
            pattern=_pattern(name, block_lists),
        )
    config = getattr(model, "config", None)
    return ModuleTree(
        modules=modules,
        children=children,
        total_params=totals[""],
        model_type=str(getattr(config, "model_type", "") or ""),
        architecture=type(model).__name__,
        task=task,
        output_head=output_head,
        classifier_head=classifier_head,
    )


def _torch_module() -> type:
    import torch

    return torch.nn.Module


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _true_numel(param: Any) -> int:
    """Element count; bitsandbytes packs two 4-bit values per byte, so count what the layer really holds."""
    n = int(param.numel())
    if type(param).__name__ == "Params4bit":
        quant_storage = getattr(param, "quant_storage", None)
        n *= 2 * (quant_storage.itemsize if quant_storage is not None else 1)
    return n


def _call_or_none(obj: Any, method: str) -> Any:
    fn = getattr(obj, method, None)
    if fn is None:
        return None
    try:
        return fn()
    except (NotImplementedError, AttributeError):
        return None


def _name_of(model: Any, module: Any, named: list[tuple[str, Any]]) -> str | None:
    if module is None:
        return None
    return next((name for name, mod in named if mod is module), None)


def _kind_and_shape(mod: Any) -> tuple[ModuleKind, int | None, int | None]:
    import torch

    if isinstance(mod, torch.nn.Linear):  # bitsandbytes' Linear4bit/Linear8bitLt subclass it
        return "linear", int(mod.in_features), int(mod.out_features)
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):  # HF's GPT-2 style transposed linear
        return "conv1d", int(mod.weight.shape[0]), int(mod.nf)
    if isinstance(mod, torch.nn.Embedding):
        return "embedding", int(mod.num_embeddings), int(mod.embedding_dim)
    if any(True for _ in mod.children()):
        return "container", None, None
    return "other", None, None


def _why_not(kind: str, mod: Any) -> str:
    if kind == "container":
        return "a container: tick the layers inside it"
    if not any(True for _ in mod.parameters(recurse=False)):
        return f"{type(mod).__name__} has no weights to adapt"
    return f"LoRA targets Linear, Conv1D and Embedding layers, not {type(mod).__name__}"


def _is_attention(name: str, mod: Any) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return bool(_ATTENTION_WORDS.search(type(mod).__name__) or _ATTENTION_WORDS.search(leaf))


def _block_lists(named: list[tuple[str, Any]]) -> list[str]:
    """Names of ModuleLists whose items are all of one class: the repeated blocks (layers, h, layer, ...)."""
    import torch

    lists = []
    for name, mod in named:
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 1:
            classes = {type(child).__name__ for child in mod}
            if len(classes) == 1:
                lists.append(name)
    return lists


def _block_index(name: str, block_lists: list[str]) -> int | None:
    for block in block_lists:
        prefix = f"{block}." if block else ""
        if name.startswith(prefix) and name != block:
            index = name[len(prefix):].split(".", 1)[0]
            if index.isdigit():
                return int(index)
    return None


def _pattern(name: str, block_lists: list[str]) -> str:
    for block in block_lists:
        prefix = f"{block}." if block else ""
        if name.startswith(prefix) and name != block:
            rest = name[len(prefix):]
            head, _, tail = rest.partition(".")
            if head.isdigit():
                return f"{prefix}*" + (f".{tail}" if tail else "")
    return name


# ---- presets -------------------------------------------------------------------------------------------------

PRESET_DESCRIPTIONS = {
    "attention": "every projection inside the attention blocks (LLaMA q,k,v,o; GPT-2 c_attn and attn.c_proj)",
    "mlp": "every linear layer in the repeated blocks outside attention (gate/up/down, c_fc/c_proj, dense)",
    "all-linear": "every linear / Conv1D layer except the output head, as PEFT's `all-linear`",
    "peft-default": "PEFT's classic default for this model family (e.g. q_proj,v_proj; c_attn; query,value)",
}


def presets(tree: ModuleTree) -> dict[str, list[str]]:
    """Preset name -> module names, computed from the tree. Empty presets are left out."""
    linear = [
        n for n in tree.targetable if tree[n].kind in ("linear", "conv1d") and not tree[n].is_output_head
    ]
    result = {
        "attention": [n for n in linear if tree[n].in_attention],
        "mlp": [n for n in linear if tree[n].block_index is not None and not tree[n].in_attention],
        "all-linear": linear,
        "peft-default": _peft_default(tree),
    }
    return {name: names for name, names in result.items() if names}


def _peft_default(tree: ModuleTree) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table

    leaves = set(table.get(tree.model_type, []))
    return [n for n in tree.targetable if tree[n].leaf in leaves]


def select(tree: ModuleTree, spec: str | Iterable[str]) -> list[str]:
    """Turn a user's target spec into module names, in tree order.

    `spec` is a preset name, or comma-separated items that are each a full module name, a leaf name
    (`q_proj`: that module in every block), a glob (`model.layers.1*.mlp.*`) or `re:<regex>` (full match).
    Raises PlanError naming the item that matches nothing targetable.
    """
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise PlanError("no target modules given")
    known = presets(tree)
    chosen: set[str] = set()
    for item in items:
        if item in known:
            chosen.update(known[item])
            continue
        matches = _match(tree, item)
        if not matches:
            hint = ", ".join(sorted(known))
            raise PlanError(f"target {item!r} matches no LoRA-targetable module (presets: {hint})")
        untargetable = [m for m in matches if not tree[m].targetable]
        if untargetable and len(untargetable) == len(matches):
            raise PlanError(f"cannot target {untargetable[0]}: {tree[untargetable[0]].why_not}")
        chosen.update(m for m in matches if tree[m].targetable)
    return [n for n in tree.modules if n in chosen]


def _match(tree: ModuleTree, item: str) -> list[str]:
    if item.startswith("re:"):
        try:
            regex = re.compile(item[3:])
        except re.error as exc:
            raise PlanError(f"bad regular expression {item[3:]!r}: {exc}") from exc
        return [n for n in tree.modules if n and regex.fullmatch(n)]
    if any(ch in item for ch in "*?["):
        return [n for n in tree.modules if n and fnmatch.fnmatchcase(n, item)]
    if item in tree.modules and item:
        return [item]
    return [n for n in tree.modules if n.endswith("." + item)]


def filter_names(tree: ModuleTree, text: str) -> list[str]:
    """Names matching a filter box: substring, glob (has * ? [) or `re:` regex. Case-insensitive substring."""
    text = text.strip()
    if not text:
        return [n for n in tree.modules if n]
    if text.startswith("re:") or any(ch in text for ch in "*?["):
        try:
            return _match(tree, text)
        except PlanError:
            return []
    lowered = text.lower()
    return [n for n in tree.modules if n and lowered in n.lower()]
