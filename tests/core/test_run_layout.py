"""The run folder's layout: checkpoint folder names are parsed in one place, and any other name is ignored."""

from __future__ import annotations

import json

import pytest
import torch

from studio.core import run_layout
from studio.core.runconfig import RunConfig
from studio.core.train.checkpoints import RunState, latest_checkpoint, save_checkpoint


@pytest.mark.parametrize("name, step", [("step-0", 0), ("step-20", 20), ("step-20 copy", None), ("step-x", None),
                                        ("step-", None), (".step-20.partial", None), ("Step-20", None)])
def test_checkpoint_step_reads_only_step_n(name, step):
    assert run_layout.checkpoint_step(name) == step
    if step is not None:
        assert run_layout.checkpoint_name(step) == name


def _checkpoint(run, name, complete=True):
    folder = run / "checkpoints" / name
    folder.mkdir(parents=True)
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"step": 0, "tokens_seen": 0, "elapsed_s": 0.0}))
    return folder


def test_checkpoints_are_ordered_by_step_and_folders_with_other_names_are_ignored(tmp_path):
    assert run_layout.checkpoint_folders(tmp_path) == [] and latest_checkpoint(tmp_path) is None
    for name in ("step-9", "step-10", "step-20 copy", "step-x", "step-30-old"):
        _checkpoint(tmp_path, name)
    _checkpoint(tmp_path, "step-11", complete=False)
    (tmp_path / "checkpoints" / "step-50").write_text("a file")

    assert [p.name for p in run_layout.checkpoint_folders(tmp_path)] == ["step-9", "step-10", "step-11"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-10"  # step-11 lacks its state


def test_checkpoint_rotation_removes_only_older_checkpoints_and_leaves_other_folders(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    for name in ("step-20 copy", "step-x"):
        _checkpoint(tmp_path, name)
    config = RunConfig()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model, optimizer, scheduler, RunState(step=step), keep=2, config=config)

    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-2", "step-20 copy", "step-3", "step-x"]
    assert latest_checkpoint(tmp_path).name == "step-3"
