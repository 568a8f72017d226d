"""Epochs in optimizer steps: how long a run given in epochs is for this data, batch and number of processes, and
when its per-epoch evaluations and checkpoints fall.

An epoch is one pass over the training examples (packed sequences when packing is on) in micro-batches of
`batch_size` on each of `processes` processes; the examples left over at its end (fewer than one micro-batch for
every process) wait for the next epoch's order, as the training loop's batching does. `gradient_accumulation`
micro-batches make one optimizer step, so an epoch is micro_batches / accumulation steps, not always a whole number:
N epochs round up to whole steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from studio.core.runconfig import TrainingConfig


@dataclass(frozen=True)
class StepSchedule:
    """A run in optimizer steps: its length, and every how many steps it evaluates and saves (0: never)."""

    total_steps: int
    eval_every: int
    save_every: int
    steps_per_epoch: float

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch


def micro_batches_per_epoch(train_examples: int, batch_size: int, processes: int = 1) -> int:
    """Micro-batches in one epoch on each process (at least one)."""
    return max(1, train_examples // (batch_size * processes))


def steps_per_epoch(train_examples: int, batch_size: int, gradient_accumulation: int = 1, processes: int = 1) -> float:
    return micro_batches_per_epoch(train_examples, batch_size, processes) / gradient_accumulation


def steps_for_epochs(epochs: float, train_examples: int, batch_size: int, gradient_accumulation: int = 1,
                     processes: int = 1) -> int:
    """Optimizer steps that make `epochs` passes over the data (rounded up; at least one)."""
    micro = micro_batches_per_epoch(train_examples, batch_size, processes)
    return max(1, math.ceil(round(epochs * micro, 9) / gradient_accumulation))


def schedule(training: TrainingConfig, train_examples: int, processes: int = 1) -> StepSchedule:
    """The run `training` describes, in steps, for `train_examples` examples (len(prepared.train)): max_steps or
    epochs, and evaluations and checkpoints every so many steps or every so many epochs."""
    per_epoch = steps_per_epoch(train_examples, training.batch_size, training.gradient_accumulation, processes)

    def steps(epochs: float) -> int:
        return steps_for_epochs(epochs, train_examples, training.batch_size, training.gradient_accumulation,
                                processes)

    total = training.max_steps if training.epochs is None else steps(training.epochs)
    eval_every = training.eval_every if training.eval_every_epochs is None else (
        steps(training.eval_every_epochs) if training.eval_every_epochs > 0 else 0)
    save_every = training.save_every if training.save_every_epochs is None else (
        steps(training.save_every_epochs) if training.save_every_epochs > 0 else 0)
    return StepSchedule(int(total or 0), int(eval_every or 0), int(save_every or 0), per_epoch)
