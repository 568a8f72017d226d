"""A checkpoint's .pt files are read weights-only: the RNG states of earlier versions (NumPy's state as an array)
still load, and a damaged file is one line, not a traceback."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from studio.core.errors import TrainingError
from studio.core.train.checkpoints import load_tensors


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
