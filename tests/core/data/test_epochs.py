"""Epochs in optimizer steps: how many steps N epochs are for the prepared data (packing included), batch size,
gradient accumulation and processes, the same count the training loop's batching walks through; per-epoch
evaluation and checkpoint schedules in steps."""

from __future__ import annotations

import json
import math

import pytest

from studio.core.data.dataset import DataSpec, prepare
from studio.core.data.epochs import micro_batches_per_epoch, schedule, steps_for_epochs
from studio.core.runconfig import TrainingConfig


def epoch_at(step: int, examples: int, batch_size: int, accumulation: int, processes: int) -> float:
    """The training loop's epoch after `step` optimizer steps (micro-batches walked / micro-batches per epoch)."""
    return step * accumulation / max(1, examples // (batch_size * processes))


@pytest.mark.parametrize("examples, batch, accumulation, processes, epochs", [
    (300, 8, 1, 1, 3), (300, 8, 4, 1, 1), (301, 8, 3, 2, 2.5), (5, 8, 1, 1, 2), (1000, 4, 2, 4, 0.1),
])
def test_n_epochs_are_the_fewest_steps_that_walk_n_passes(examples, batch, accumulation, processes, epochs):
    steps = steps_for_epochs(epochs, examples, batch, accumulation, processes)
    assert epoch_at(steps, examples, batch, accumulation, processes) >= epochs - 1e-9
    assert steps == 1 or epoch_at(steps - 1, examples, batch, accumulation, processes) < epochs


def test_the_schedule_follows_the_prepared_data_and_packing(tmp_path, default_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"short document number {i}"}) + "\n" for i in range(96)))
    plain = prepare(DataSpec(str(path), max_length=64), default_tokenizer)
    packed = prepare(DataSpec(str(path), max_length=64, packing=True), default_tokenizer)
    training = TrainingConfig(max_steps=None, epochs=2, batch_size=4, gradient_accumulation=2,
                              eval_every=None, eval_every_epochs=0.5, save_every=None, save_every_epochs=1)
    for prepared in (plain, packed):
        micro = micro_batches_per_epoch(len(prepared.train), 4)
        run = schedule(training, len(prepared.train))
        assert run.total_steps == math.ceil(2 * micro / 2) and run.steps_per_epoch == micro / 2
        assert run.eval_every == math.ceil(0.5 * micro / 2) and run.save_every == math.ceil(micro / 2)
        assert run.epochs == pytest.approx(2, abs=0.5 / run.steps_per_epoch)
    assert schedule(training, len(packed.train)).total_steps < schedule(training, len(plain.train)).total_steps
    on_two = schedule(training, len(plain.train), processes=2)
    assert on_two.total_steps == math.ceil(2 * (len(plain.train) // 8) / 2)


def test_a_run_in_steps_keeps_its_steps():
    run = schedule(TrainingConfig(max_steps=40, eval_every=10, save_every=0), 1000)
    assert (run.total_steps, run.eval_every, run.save_every) == (40, 10, 0)
    assert run.steps_per_epoch == 1000 // 8
