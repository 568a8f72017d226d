"""The one line a run that ended on an exception shows: out of GPU memory (a real torch.cuda.OutOfMemoryError:
this machine has no GPU to run out of), a full disk, and a bug, whose traceback goes to error.log when there is
room for it."""

from __future__ import annotations

import errno

import torch

from studio.core.errors import DivergedError
from studio.core.runconfig import ModelConfig, RunConfig, TrainingConfig
from studio.core.train.failures import failure_line


def config(**training) -> RunConfig:
    return RunConfig(model=ModelConfig(), plan={"targets": "q_proj"},
                     data={"train_path": "x.jsonl", "max_length": 1024},
                     training=TrainingConfig(batch_size=8, **training))


def test_out_of_gpu_memory_names_the_step_and_only_the_levers_not_pulled_yet(tmp_path):
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.65 GiB total)")
    assert failure_line(oom, 41, config(), tmp_path) == (
        "out of GPU memory at step 42: lower the batch size (now 8) or the maximum length (now 1024), turn on "
        "gradient checkpointing or load the base in 4-bit; then resume from the last checkpoint")
    pulled = RunConfig(model=ModelConfig(quantization="4bit"), plan={"targets": "q_proj"},
                       data={"train_path": "x.jsonl"}, training=TrainingConfig(gradient_checkpointing=True))
    assert failure_line(oom, 0, pulled, tmp_path) == (
        "out of GPU memory at step 1: lower the batch size (now 8) or the maximum length (now 512); then resume from "
        "the last checkpoint")
    assert list(tmp_path.iterdir()) == []  # a person's problem, not a bug: no error.log


def test_a_full_disk_and_a_studio_error_are_their_own_line(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))
    assert failure_line(full, 9, config(), tmp_path) == (
        f"the disk is full ({tmp_path / 'metrics.jsonl'}) at step 10: free some space, then resume")
    diverged = DivergedError("the loss became NaN at step 3: lower the learning rate (now 1e+04)\nmore")
    assert failure_line(diverged, 2, config(), tmp_path) == "the loss became NaN at step 3: lower the learning " \
                                                             "rate (now 1e+04)"


def test_a_bug_keeps_its_traceback_in_error_log_or_says_it_could_not(tmp_path):
    try:
        {}["missing"]
    except KeyError as exc:
        bug = exc
    line = failure_line(bug, 3, config(), tmp_path)
    assert line == f"internal error (KeyError: 'missing'); details in {tmp_path / 'error.log'}"
    assert "Traceback" in (tmp_path / "error.log").read_text() and "KeyError" in (tmp_path / "error.log").read_text()

    gone = tmp_path / "a-file"
    gone.write_text("where the run folder was")
    line = failure_line(bug, 3, config(), gone)
    assert line.startswith("internal error (KeyError: 'missing'); its details could not be saved (cannot write ")
    assert gone.read_text() == "where the run folder was"
