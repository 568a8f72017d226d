"""Fail fast: a run file or data file that cannot work is refused before the model loads, in one line; a run that
can work passes the check untouched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from studio.core import events as ev
from studio.core.data.dataset import DEMO_DIR
from studio.core.errors import DataError
from studio.core.runconfig import ModelConfig, RunConfig, TrainingConfig
from studio.core.train.engine import train
from studio.core.train.preflight import check_run


def config_for(model: str, train_path: Path, **data) -> RunConfig:
    return RunConfig(model=ModelConfig(source=model, device="cpu"), plan={"targets": "q_proj", "rank": 2},
                     data={"train_path": str(train_path), "format": "instruction", **data},
                     training=TrainingConfig(max_steps=1, batch_size=2, save_every=0, spectrum_every=0, eval_every=0))


def test_a_run_that_can_work_passes_the_check(tiny_model_folder):
    demo = DEMO_DIR / "train.jsonl"
    check_run(config_for(str(tiny_model_folder), demo, val_path=str(DEMO_DIR / "heldout.jsonl")))


def test_train_refuses_an_empty_data_file_before_it_opens_the_model(tiny_model_folder, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    events: list = []
    result = train(config_for(str(tiny_model_folder), tmp_path / "empty.jsonl"), events.append,
                   run_dir=tmp_path / "run")
    assert isinstance(result, ev.Failed)
    assert result.message == f"{tmp_path / 'empty.jsonl'} holds no rows"
    assert [type(e).__name__ for e in events] == ["Failed"]  # no "Opening ..." before it: the model never loaded


def test_the_cli_refuses_an_unusable_data_file_before_torch_is_imported(tiny_model_folder, tmp_path):
    (tmp_path / "notes.jsonl").write_text("these are notes, not JSON\n")
    run = tmp_path / "run.yaml"
    run.write_text(f"model: {{source: {tiny_model_folder}}}\nplan: {{targets: q_proj}}\n"
                   f"data: {{train_path: notes.jsonl}}\n")
    code = ("import sys\nfrom studio.cli import main\n"
            f"code = main(['train', {str(run)!r}, '--run-dir', {str(tmp_path / 'run')!r}])\n"
            "print(code, 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert result.stderr == (f"lora-studio: {tmp_path / 'notes.jsonl'} has no readable row: row 1 is not valid JSON "
                             "(Expecting value at column 1)\n")
    assert not (tmp_path / "run").exists()  # refused before a run folder was made


@pytest.mark.parametrize("labels, num_labels, ok", [([0, 1, 1, 0], 2, True), ([0, 1, 2], 2, False),
                                                      (["yes", "no"], 2, True), (["a", "b", "c"], 3, True)])
def test_classes_must_fit_the_classifier_head(tmp_path, tiny_model_folder, labels, num_labels, ok):
    import json

    rows = "".join(json.dumps({"text": f"t{i}", "label": label}) + "\n" for i, label in enumerate(labels))
    (tmp_path / "train.jsonl").write_text(rows)
    config = RunConfig(model=ModelConfig(source=str(tiny_model_folder), task="seq-cls", num_labels=num_labels),
                       plan={"targets": "q_proj"}, data={"train_path": str(tmp_path / "train.jsonl"),
                                                         "format": "classification"})
    if ok:
        check_run(config)
    else:
        with pytest.raises(DataError, match=f"has {len(set(labels))} classes"):
            check_run(config)
