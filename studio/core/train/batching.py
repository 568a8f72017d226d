"""Which examples each optimizer step trains on, as a pure function of (seed, step): resume needs no record of the
data position, and every process of a multi-process run takes its own slice of the same order.

An epoch is one pass over the examples in a random order drawn from `seed + epoch`. It is cut into micro-batches of
`batch_size` per process; `gradient_accumulation` consecutive micro-batches make one optimizer step. Examples left
over at the end of an epoch (fewer than one micro-batch for every process) wait for the next epoch's order.

Given the examples' lengths (unpacked data), the order is length-grouped: the random order is cut into groups of
GROUP_BLOCKS blocks, a block being one micro-batch of every process; each group is sorted by length and cut into
its blocks, and the blocks are shuffled (from the same seed). Each micro-batch then holds examples of similar
lengths, so little of it is padding, while which examples meet, and when, stays random. The blocks span all
processes, so the rows of a step are the same whatever the number of processes at the same global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

GROUP_BLOCKS = 64  # blocks sorted together: long enough to find similar lengths, short enough to stay random


@dataclass
class StepBatch:
    """One optimizer step's micro-batches (tensors, on the device once `to_device` ran) and what they count."""

    micro: list[dict[str, Any]]
    # the loss's divisor: the tokens that carry loss in all micro-batches of all processes, per process (DDP
    # averages the processes' gradients), so the step's loss is the token-weighted mean one big batch would give
    label_tokens: float
    tokens: int  # non-padding tokens this process fed to the model
    positions: int = 0  # positions the model computes (rows × width): tokens / positions is the padding efficiency


class Batches:
    def __init__(self, examples: Sequence[Any], collate: Any, *, batch_size: int, accumulation: int, world: int,
                 rank: int, seed: int, is_lm: bool, lengths: Sequence[int] | None = None) -> None:
        self.examples = examples
        self.lengths = lengths  # given: length-grouped micro-batches (see the module docstring)
        self.collate = collate  # examples -> dict of CPU tensors
        self.batch_size, self.accumulation = batch_size, accumulation
        self.world, self.rank, self.seed, self.is_lm = world, rank, seed, is_lm
        self.micro_per_epoch = max(1, len(examples) // (batch_size * world))
        self._order: tuple[int, Any] | None = None  # (epoch, permutation): drawn once per epoch

    def epoch_at(self, step: int) -> float:
        """Epochs completed after `step` optimizer steps (fractional)."""
        return step * self.accumulation / self.micro_per_epoch

    def for_step(self, step: int) -> StepBatch:
        """The micro-batches of optimizer step `step` (0-based), on the CPU, with their token counts."""
        indices = range(step * self.accumulation, (step + 1) * self.accumulation)
        rows = [self._micro_batch(index, self.rank) for index in indices]
        micro = [self.collate(examples) for examples in rows]
        # real tokens: a padded batch's mask says which; a packed one carries position ids instead, so its examples do
        tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else
                     sum(len(e.input_ids) for e in examples) for b, examples in zip(micro, rows))
        positions = sum(int(b["input_ids"].numel()) for b in micro)
        if not self.is_lm:
            return StepBatch(micro, 0, tokens, positions)
        # the other processes' batches are known here too (the order is shared): count their loss tokens without
        # asking them, which would cost a collective and a host sync
        counted = sum(_loss_tokens(own if rank == self.rank else self._micro_batch(index, rank))
                      for index, own in zip(indices, rows) for rank in range(self.world))
        return StepBatch(micro, counted / self.world if self.world > 1 else counted, tokens, positions)

    def _micro_batch(self, index: int, rank: int) -> list[Any]:
        import torch

        epoch, position = divmod(index, self.micro_per_epoch)
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(self.examples), generator=generator)
            if self.lengths is not None:
                order = group_by_length(order, self.lengths, self.batch_size * self.world, generator)
            self._order = (epoch, order.tolist())
        start = (position * self.world + rank) * self.batch_size
        return [self.examples[i] for i in self._order[1][start:start + self.batch_size]]


def _loss_tokens(examples: Sequence[Any]) -> int:
    """Tokens that carry loss: the model shifts labels by one, so the first position of each row never counts."""
    import numpy as np

    return sum(int(np.count_nonzero(np.asarray(e.labels[1:]) != -100)) for e in examples)


def group_by_length(order: Any, lengths: Sequence[int], block: int, generator: Any) -> Any:
    """`order` (a permutation tensor) length-grouped in blocks of `block` examples (see the module docstring);
    the examples after the last whole block stay at the end."""
    import numpy as np
    import torch

    whole = len(order) - len(order) % block
    of = np.asarray(lengths)
    blocks = []
    for start in range(0, whole, GROUP_BLOCKS * block):
        group = order[start:min(start + GROUP_BLOCKS * block, whole)]
        group = group[torch.from_numpy(np.argsort(-of[group.numpy()], kind="stable"))]
        blocks.extend(group.split(block))
    shuffled = [blocks[i] for i in torch.randperm(len(blocks), generator=generator).tolist()]
    return torch.cat([*shuffled, order[whole:]])
