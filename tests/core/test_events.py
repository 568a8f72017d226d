"""How events read in words: one `describe`, used by the CLI and the window's log alike."""

from __future__ import annotations

import pytest

from studio.core import events as ev

STARTED = dict(run_dir="runs/demo", model="SmolLM2-135M-Instruct", device="cpu", plan={}, counts={"trainable": 1234567},
               train_examples=240, val_examples=60, total_steps=60)


@pytest.mark.parametrize("event, words", [
    (ev.RunStarted(**STARTED), "Run folder runs/demo: SmolLM2-135M-Instruct on cpu, 1,234,567 trainable parameters, "
                               "240 training / 60 validation examples, 60 steps"),
    (ev.RunStarted(**STARTED, start_step=20), "Run folder runs/demo: SmolLM2-135M-Instruct on cpu, 1,234,567 trainable "
                                              "parameters, 240 training / 60 validation examples, from step 20 to 60"),
    (ev.EvalMetrics(20, 0.61234), "Step 20: validation loss 0.6123"),
    (ev.EvalMetrics(20, 0.61234, 0.75, "exact_match"), "Step 20: validation loss 0.6123, exact_match 0.750"),
    (ev.CheckpointSaved(20, "runs/demo/checkpoints/step-20"), "Checkpoint at step 20: runs/demo/checkpoints/step-20"),
    (ev.Paused(21, "runs/demo/checkpoints/step-21"), "Paused at step 21 (checkpoint runs/demo/checkpoints/step-21)"),
    (ev.Resumed(21), "Resumed at step 21"),
    (ev.LogMessage("compile_layers is off for this run: no CUDA", "warning"), "compile_layers is off for this run: "
                                                                             "no CUDA"),
    (ev.Finished(60, "runs/demo", "runs/demo/adapter", False, 0.25, 0.3, 0.9),
     "Finished at step 60, last loss 0.2500, score 0.900; adapter saved to runs/demo/adapter"),
    (ev.Finished(12, "runs/demo", "runs/demo/adapter", True, None),
     "Stopped at step 12; adapter saved to runs/demo/adapter"),
    (ev.Failed("CUDA out of memory: lower the batch size", 30, "runs/demo/checkpoints/step-20"),
     "Failed at step 30: CUDA out of memory: lower the batch size (last checkpoint: runs/demo/checkpoints/step-20)"),
    (ev.Failed("data.jsonl holds no rows", 0), "data.jsonl holds no rows"),
])
def test_describe_says_each_event_in_one_line(event, words):
    assert ev.describe(event) == words


def test_step_metrics_and_spectra_have_no_words_they_are_plotted():
    step = ev.StepMetrics(1, 60, 0.1, 2.5, 2e-3, 1.0, 900.0, 4096, 3.0, 177.0)
    assert ev.describe(step) is None
    assert ev.describe(ev.SpectrumSnapshot(10, ())) is None
