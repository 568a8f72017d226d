"""A checkpoint's .pt files are read weights-only: the RNG states of earlier versions (NumPy's state as an array)
still load, and a damaged file is one line, not a traceback. A step written a second time is swapped in whole."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from studio.core import events as ev
from studio.core.data.dataset import DEMO_DIR
from studio.core.errors import TrainingError
from studio.core.files import MANIFEST
from studio.core.runconfig import ModelConfig, RunConfig, TrainingConfig
from studio.core.train.checkpoints import latest_checkpoint, load_tensors, read_state
from studio.core.train.engine import TrainControl, train


def test_rng_states_saved_by_earlier_versions_still_load_weights_only(tmp_path):
    np.random.seed(3)
    state = np.random.get_state()
    torch.save({"python": random.getstate(), "numpy": state, "torch": torch.get_rng_state()}, tmp_path / "rng.pt")
    loaded = load_tensors(tmp_path / "rng.pt")
    assert loaded["numpy"][0] == "MT19937" and np.array_equal(loaded["numpy"][1], state[1])
    assert torch.equal(loaded["torch"], torch.get_rng_state())


def test_a_damaged_checkpoint_file_is_one_line(tmp_path):
    (tmp_path / "optimizer.pt").write_bytes(b"\x00not a checkpoint at all" * 4)
    with pytest.raises(TrainingError) as caught:
        load_tensors(tmp_path / "optimizer.pt")
    assert str(caught.value) == (f"cannot read the checkpoint's {tmp_path / 'optimizer.pt'}: it is damaged or not a "
                                 "checkpoint file")


def test_a_stop_right_after_a_checkpoint_writes_it_again_as_a_new_folder_swapped_in_whole(tiny_model_folder, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join((DEMO_DIR / "train.jsonl").read_text().splitlines()[:8]) + "\n")
    config = RunConfig(
        model=ModelConfig(source=str(tiny_model_folder), device="cpu"), plan={"targets": "q_proj", "rank": 2},
        data={"train_path": str(data), "format": "instruction", "max_length": 64},
        training=TrainingConfig(max_steps=4, batch_size=2, save_every=2, keep_checkpoints=1, eval_every=0,
                                spectrum_every=0))
    control = TrainControl()
    first: list[int] = []

    def stop_after_the_first_checkpoint(event) -> None:
        if isinstance(event, ev.CheckpointSaved) and not first:
            first.append(os.stat(event.path).st_ino)
            control.request_stop()

    result = train(config, stop_after_the_first_checkpoint, control, run_dir=tmp_path / "run")
    assert isinstance(result, ev.Finished) and result.stopped_early and result.step == 2, result
    step_2 = tmp_path / "run" / "checkpoints" / "step-2"
    assert step_2.stat().st_ino != first[0]  # the stop's checkpoint is a new folder, not the first one refilled
    assert sorted(p.name for p in step_2.parent.iterdir()) == ["step-2"]  # nothing staged or retired is left
    assert sorted(p.name for p in step_2.iterdir()) == [MANIFEST, "adapter", "optimizer.pt", "rng.pt", "scheduler.pt",
                                                        "trainer_state.json"]
    assert latest_checkpoint(tmp_path / "run") == step_2 and read_state(step_2).step == 2
