"""Singular values of every LoRA update ΔW = scaling·B·A, computed without forming ΔW.

With thin QR factorisations B = Q_B·R_B (out×r) and Aᵀ = Q_A·R_A (in×r), ΔW = scaling·Q_B·(R_B·R_Aᵀ)·Q_Aᵀ,
and Q_B, Q_A have orthonormal columns, so the singular values of ΔW are |scaling| times those of the r×r matrix
R_B·R_Aᵀ. Same-shaped factors are stacked and factorised in one batched call: for SmolLM2-135M with all-linear
targets that is 210 modules in about five QR batches and one SVD batch per rank (bench/bench_spectrum.py).

Covered LoRA layers: nn.Linear and HF Conv1D (lora_A / lora_B), embeddings (lora_embedding_A: r×vocab,
lora_embedding_B: dim×r) and convolutions whose B is the usual ungrouped 1×1 kernel (A flattened to r×in·k).
Layers whose factors do not have that shape (grouped convolutions, parameter-targeting wrappers) are left out.
For DoRA the spectrum is of the low-rank direction update scaling·B·A, before the magnitude vector rescales
the columns of the merged weight. A lora_B bias adds to the output, not to ΔW, so it plays no part here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from studio.core.adapters.folder import ADAPTER_CONFIG, read_adapter_config, read_lora_factors, weights_file
from studio.core.errors import ExportError
from studio.core.events import ModuleSpectrum

ENERGY_FRACTIONS = (0.90, 0.95)
# Cumulative energy shares are float sums: a share that should equal the fraction may land a hair below it.
SHARE_TOLERANCE = 1e-9

Verdict = Literal["full", "smaller", "untrained"]


@dataclass(frozen=True)
class RankAdvice:
    """Whether a module (or a module kind such as `q_proj`) needs its LoRA rank.

    `effective_rank` is the 95%-energy effective rank; `suggested_rank` the smallest power of two at least that
    large, never above `rank`. Verdicts: "full" (the suggestion is the rank itself), "smaller" (the suggestion
    would hold 95% of the update), "untrained" (the update is still zero, nothing to judge).
    """

    name: str
    rank: int
    effective_rank: int
    suggested_rank: int
    verdict: Verdict


@dataclass(frozen=True)
class RankReport:
    modules: tuple[RankAdvice, ...]
    kinds: tuple[RankAdvice, ...]  # one per leaf name, judged by its most demanding module
    summary: str  # one line for a person


@dataclass(frozen=True)
class _Factors:
    """ΔW = scaling·B·A with A: r×fan_in and B: fan_out×r once flattened past the first dimension (conv
    kernels). Tensors are kept as stored, in any float dtype: the batched code converts whole stacks."""

    name: str
    a: Any
    b: Any
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def compute_spectra(model: Any, adapter: str | None = None, *,
                    whole: Mapping[str, Any] | None = None) -> tuple[ModuleSpectrum, ...]:
    """One ModuleSpectrum per LoRA-adapted module of `model`, in the model's module order.

    `model` is a PeftModel, its LoraModel, or a model with LoRA layers injected. Names are the base model's
    module names (`model.layers.0.self_attn.q_proj`). `adapter` defaults to the active adapter; one that no
    layer holds gives an empty tuple. `whole`: the factors by `model`'s parameter names, used instead of its own
    (a model sharded across processes holds a slice of each: FSDP).
    """
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTuner

    base = model
    if isinstance(base, PeftModel):
        base = base.get_base_model()
    elif isinstance(base, BaseTuner):
        base = base.model
    layers = _lora_layers(base, LoraLayer)
    if not layers:
        return ()
    adapter = adapter or layers[0][1].active_adapters[0]
    by_tensor = {id(p): whole[n] for n, p in model.named_parameters() if n in whole} if whole else {}
    with torch.no_grad():
        factors = [f for name, layer in layers if (f := _layer_factors(name, layer, adapter, by_tensor)) is not None]
        return _spectra(factors)


def read_adapter_spectra(folder: str | Path) -> tuple[ModuleSpectrum, ...]:
    """Spectra straight from a saved PEFT LoRA adapter folder, without the base model.

    Ranks and scalings come from adapter_config.json (rank_pattern / alpha_pattern matched as PEFT matches
    them). Modules are ordered by name, layer numbers compared as numbers. Raises ExportError for a folder
    that is missing, is not a LoRA adapter, or whose files disagree.
    """
    import torch

    path = Path(folder).expanduser()
    config = read_adapter_config(path)
    pairs = read_lora_factors(path)
    weights = weights_file(path)
    factors = []
    for name in sorted(pairs, key=_natural_key):
        pair = pairs[name]
        if set(pair) != {"A", "B"}:
            missing = "B" if "A" in pair else "A"
            raise ExportError(f"{weights} lacks the LoRA {missing} matrix of {name}: save it again")
        rank, scaling = _configured_scaling(config, name)
        if not _fits_rank(pair["A"], pair["B"], rank):
            raise ExportError(
                f"{name} has rank {pair['A'].shape[0]} in {weights.name} but {ADAPTER_CONFIG} gives r={rank}: "
                "the two files come from different adapters"
            )
        factors.append(_Factors(name, pair["A"], pair["B"], scaling))
    with torch.no_grad():
        return _spectra(factors)


def spectrum_from_values(name: str, values: Sequence[float], rank: int) -> ModuleSpectrum:
    """A ModuleSpectrum for given singular values (sorted here, largest first), with its energy figures."""
    import torch

    ordered = torch.tensor(sorted((float(v) for v in values), reverse=True), dtype=torch.float64)
    k90, k95, top1 = _energy_figures(ordered[None, :])
    return ModuleSpectrum(name, tuple(ordered.tolist()), rank, int(k90[0]), int(k95[0]), float(top1[0]))


def energy_share(spectrum: ModuleSpectrum, k: int) -> float:
    """Share of the update's energy (sum of squared singular values) held by its `k` largest values."""
    energies = [v * v for v in spectrum.values]
    total = sum(energies)
    return sum(energies[: max(k, 0)]) / total if total > 0 else 0.0


def advise_ranks(spectra: Sequence[ModuleSpectrum]) -> RankReport:
    """Rank advice per module and per module kind (leaf name), from the 95%-energy effective ranks."""
    modules = tuple(_advice(s.name, s.rank, s.effective_rank_95, s.top1_energy == 0.0) for s in spectra)
    by_kind: dict[str, list[ModuleSpectrum]] = {}
    for s in spectra:
        by_kind.setdefault(s.name.rsplit(".", 1)[-1], []).append(s)
    kinds = []
    for kind, members in by_kind.items():
        trained = [s for s in members if s.top1_energy > 0.0]
        needed = max((s.effective_rank_95 for s in trained), default=0)
        kinds.append(_advice(kind, max(s.rank for s in members), needed, not trained))
    return RankReport(modules, tuple(kinds), _summary(kinds))


def _advice(name: str, rank: int, effective_rank: int, untrained: bool) -> RankAdvice:
    if untrained:
        return RankAdvice(name, rank, 0, rank, "untrained")
    suggested = min(rank, 1 << max(effective_rank - 1, 0).bit_length())
    return RankAdvice(name, rank, effective_rank, suggested, "smaller" if suggested < rank else "full")


def _summary(kinds: Sequence[RankAdvice]) -> str:
    if not kinds:
        return "no LoRA modules to advise on"
    smaller = [k for k in kinds if k.verdict == "smaller"]
    full = [k for k in kinds if k.verdict == "full"]
    untrained = [k for k in kinds if k.verdict == "untrained"]
    if not smaller and not full:
        return "the update is still zero (B starts at zero): train some steps before judging the rank"
    parts = []
    if smaller:
        moves = ", ".join(f"{k.name} {k.rank}→{k.suggested_rank}" for k in smaller)
        parts.append(f"95% of the update fits a smaller rank: {moves}")
    if full:
        parts.append(f"{', '.join(k.name for k in full)} use{'s' if len(full) == 1 else ''} the rank fully")
    if untrained:
        parts.append(f"{', '.join(k.name for k in untrained)} still untrained")
    return "; ".join(parts)


def _lora_layers(root: Any, layer_type: type) -> list[tuple[str, Any]]:
    """(name, layer) of every LoRA layer, in module order. Unlike named_modules() this does not walk into a
    LoRA layer's own children (its factor dicts, dropout, base layer), which are most of a wrapped model."""
    found: list[tuple[str, Any]] = []
    pending = [("", root)]
    while pending:
        name, module = pending.pop()
        if isinstance(module, layer_type):
            found.append((name, module))
            continue
        children = [(f"{name}.{key}" if name else key, m) for key, m in module._modules.items() if m is not None]
        pending.extend(reversed(children))
    return found


def _layer_factors(name: str, layer: Any, adapter: str, by_tensor: Mapping[int, Any]) -> _Factors | None:
    if adapter in layer.lora_A:
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    elif adapter in layer.lora_embedding_A:
        a, b = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    else:
        return None
    a, b = by_tensor.get(id(a), a), by_tensor.get(id(b), b)
    if not _fits_rank(a, b, layer.r[adapter]):
        return None  # not a plain product of two matrices (grouped conv, parameter wrapper)
    return _Factors(name, a.detach(), b.detach(), float(layer.scaling[adapter]))


def _fits_rank(a: Any, b: Any, rank: int) -> bool:
    return a.dim() >= 2 and b.dim() >= 2 and a.shape[0] == rank and math.prod(b.shape[1:]) == rank


def _spectra(factors: Sequence[_Factors]) -> tuple[ModuleSpectrum, ...]:
    """The batched computation: QR per factor shape, then one SVD batch per r×r shape."""
    import torch

    if not factors:
        return ()
    r_a = _r_factors([f.a for f in factors], transpose=True)  # R of Aᵀ (in×r)
    r_b = _r_factors([f.b for f in factors], transpose=False)  # R of B (out×r)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i in range(len(factors)):
        groups.setdefault((tuple(r_b[i].shape), tuple(r_a[i].shape), r_a[i].device), []).append(i)
    out: list[ModuleSpectrum | None] = [None] * len(factors)
    for members in groups.values():
        core = torch.stack([r_b[i] for i in members]) @ torch.stack([r_a[i] for i in members]).mT
        scalings = torch.tensor([abs(factors[i].scaling) for i in members], dtype=core.dtype, device=core.device)
        values = torch.linalg.svdvals(core) * scalings[:, None]
        k90, k95, top1 = _energy_figures(values)
        rows = zip(members, values.tolist(), k90.tolist(), k95.tolist(), top1.tolist())
        for i, row, e90, e95, t1 in rows:
            out[i] = ModuleSpectrum(factors[i].name, tuple(row), factors[i].rank, e90, e95, t1)
    return tuple(s for s in out if s is not None)


def _r_factors(matrices: Sequence[Any], transpose: bool) -> list[Any]:
    """The R factor of the thin QR of each matrix (or of its transpose), one float32 batched call per shape."""
    import torch

    by_shape: dict[tuple[Any, ...], list[int]] = {}
    for i, m in enumerate(matrices):
        by_shape.setdefault((tuple(m.shape), m.device, m.dtype), []).append(i)
    out: list[Any] = [None] * len(matrices)
    for members in by_shape.values():
        stacked = torch.stack([matrices[i] for i in members]).flatten(2).float()
        # The transpose of a row-major stack is column-major: LAPACK gets its layout without a transposing copy.
        r = torch.linalg.qr(stacked.mT if transpose else stacked, mode="r").R
        for j, i in enumerate(members):
            out[i] = r[j]
    return out


def _energy_figures(values: Any) -> tuple[Any, Any, Any]:
    """Effective ranks at 90% / 95% energy and the top-1 energy share for each row of singular values.

    A row with no energy (B still zero) gets 0 for all three instead of 0/0.
    """
    import torch

    energy = values.double().square()
    total = energy.sum(-1, keepdim=True)
    trained = total[:, 0] > 0
    share = energy.cumsum(-1) / torch.where(total > 0, total, torch.ones_like(total))
    ranks = [
        torch.where(trained, (share < fraction - SHARE_TOLERANCE).sum(-1) + 1, 0).clamp_max(values.shape[-1])
        for fraction in ENERGY_FRACTIONS
    ]
    top1 = torch.where(trained, share[:, :1].sum(-1), 0.0)
    return ranks[0], ranks[1], top1


def _configured_scaling(config: dict[str, Any], name: str) -> tuple[int, float]:
    """(r, scaling) of module `name` as PEFT sets them when it loads this config."""
    rank = int(_pattern_value(config.get("rank_pattern") or {}, name, config["r"]))
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"]))
    return rank, alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first key that matches the end of the module name on a dot boundary."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error as exc:
            raise ExportError(f"{ADAPTER_CONFIG}: {key!r} is not a valid module pattern ({exc})") from exc
    return default


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
