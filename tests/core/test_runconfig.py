from __future__ import annotations

import pytest

from studio.core import runconfig
from studio.core.errors import RunConfigError


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_example_run_file_loads_with_paths_relative_to_it(tmp_path):
    (tmp_path / "t.jsonl").write_text("{}\n")
    path = write(tmp_path, runconfig.EXAMPLE.format(train="t.jsonl", val="null"))
    config = runconfig.load(path)
    assert config.data["train_path"] == str(tmp_path / "t.jsonl")
    assert config.output_dir == str(tmp_path / "runs")
    assert config.plan["targets"] == "all-linear" and config.training.max_steps == 60
    again = tmp_path / "again.yaml"
    runconfig.save(config, again)
    assert runconfig.load(again) == config


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: [1, 2]\nplan: {targets: q_proj}\ndata: {train_path: x}\n", "`model` must be a mapping"),
        ("plan: {targets: q_proj}\ndata: {train_path: x}\ntraining: {max_stepz: 3}\n", "max_stepz"),
        ("plan: {targets: q_proj}\ndata: {train_path: x}\ntraining: {batch_size: lots}\n", "must be a number"),
        ("plan: {targets: q_proj}\ndata: {train_path: x}\ntraining: {max_steps: 0}\n", "at least 1"),
        ("plan: {rank: 8}\ndata: {train_path: x}\n", "plan.targets is missing"),
        ("plan: {targets: q_proj}\n", "data.train_path is missing"),
        ("plan: {targets: [q_proj\n", "not valid YAML at line"),
        ("- just\n- a list\n", "must be a mapping"),
    ],
)
def test_bad_run_files_name_the_field(tmp_path, text, message):
    with pytest.raises(RunConfigError, match=message) as info:
        runconfig.load(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_missing_run_file_is_reported(tmp_path):
    with pytest.raises(RunConfigError, match="cannot read the run file"):
        runconfig.load(tmp_path / "nope.yaml")
