"""LoRA's dropout on the CPU: the same masks' distribution for a tenth of the time.

PEFT puts an `nn.Dropout` before every adapter (`lora_B(lora_A(dropout(x)))`), so each adapted layer draws a
Bernoulli mask as large as its input. On the CPU torch draws such a mask one element at a time (`bernoulli_` runs
serially, about 5 ns an element), and on the built-in model (SmolLM2-135M, all-linear r=8, batch 8) that costs
more than the adapters' matmuls: about a quarter of a training step. `SparseDropout` draws only the positions
that are dropped. The gaps between them are geometric (the number of Bernoulli(p) trials up to the next success),
so about p·n uniform numbers give exactly the i.i.d. Bernoulli(p) mask that torch draws with n of them; kept
values are scaled by 1/(1-p) as nn.Dropout does. The masks differ from torch's (another use of the same seeded
generator) but follow the same law, which is all dropout promises.

On a GPU torch's dropout draws its mask inside one parallel kernel; the swap is for the CPU only.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

SIGMAS = 6.0  # one draw covers the mask with this margin over the expected number of gaps; rarely a second


def dropped_positions(n: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sorted flat indices in [0, n) each of which is in the result with probability p, independently."""
    expected = n * p
    draws = int(expected + SIGMAS * math.sqrt(expected) + 16)
    per_log = 1.0 / math.log1p(-p)
    parts: list[torch.Tensor] = []
    last = -1
    while last < n:
        uniform = torch.rand(draws, generator=generator)
        # P(gap >= k) = (1-p)^(k-1): the inverse of the geometric law, on 1 - u in (0, 1]
        gaps = (torch.log1p(-uniform) * per_log).long() + 1
        positions = gaps.cumsum_(0).add_(last)
        parts.append(positions)
        last = int(positions[-1])
    positions = parts[0] if len(parts) == 1 else torch.cat(parts)
    return positions[: int(torch.searchsorted(positions, n))]


class SparseDropout(nn.Dropout):
    """nn.Dropout whose mask is drawn by `dropped_positions` (still an nn.Dropout for code that checks the type)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return x * 0.0
        kept = x * (1.0 / (1.0 - self.p))  # one dense pass; the dropped positions are zeroed in place
        kept.view(-1).index_fill_(0, dropped_positions(x.numel(), self.p), 0.0)
        return kept


def use_sparse_dropout(model: Any) -> Callable[[], None]:
    """Swap every adapter's nn.Dropout in `model` (a PeftModel) for a SparseDropout of the same p. Returns the
    undo, which puts PEFT's own modules back."""
    swapped: list[tuple[nn.ModuleDict, str, nn.Module]] = []
    for module in model.modules():
        holder = getattr(module, "lora_dropout", None)
        if not isinstance(holder, nn.ModuleDict):
            continue
        for name, dropout in list(holder.items()):
            if type(dropout) is nn.Dropout and dropout.p > 0:
                replacement = SparseDropout(dropout.p)
                replacement.train(dropout.training)
                holder[name] = replacement
                swapped.append((holder, name, dropout))

    def undo() -> None:
        for holder, name, original in swapped:
            original.train(holder[name].training)
            holder[name] = original

    return undo
