from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import yaml

from studio.core import runconfig
from studio.core.errors import RunConfigError


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_example_run_file_loads_with_paths_relative_to_it(tmp_path):
    (tmp_path / "t.jsonl").write_text("{}\n")
    path = write(tmp_path, runconfig.example({"train_path": "t.jsonl", "val_path": None}))
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
        ("plan: {targets: q_proj}\ndata: {train_path: x}\ntraining: {max_steps: 30, epochs: 2}\n",
         "give max_steps or epochs, not both"),
        ("plan: {targets: q_proj}\ndata: {train_path: x}\ntraining: {max_steps: null}\n",
         "give max_steps .optimizer steps. or epochs"),
        ("plan: {targets: q_proj}\ndata: {train_path: x}\ntraining: {epochs: 0}\n", "epochs must be above 0"),
        ("plan: {targets: q_proj}\ndata: {train_path: x}\ntraining: {epochs: many}\n", "epochs must be a number"),
        ("plan: {targets: q_proj}\ndata: {train_path: x}\ntraining: {eval_every: 5, eval_every_epochs: 1}\n",
         "give eval_every or eval_every_epochs, not both"),
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


@pytest.mark.parametrize("cls", [runconfig.ModelConfig, runconfig.TrainingConfig, runconfig.RunConfig])
def test_every_run_file_field_carries_its_help(cls):
    missing = [f.name for f in dataclasses.fields(cls) if not runconfig.field_help(cls, f.name).strip()]
    assert missing == []


def _commented(text: str, section: str) -> dict[str, str]:
    """field -> the comment lines above it, joined, for one section of a generated run file."""
    found, comment, inside = {}, [], False
    for line in text.splitlines():
        if not line.startswith("  "):  # a top-level line: a section's key, its comment or a blank
            inside, comment = line == f"{section}:", []
        elif inside and line.lstrip().startswith("# "):
            comment.append(line.lstrip()[2:])
        elif inside:
            found[line.split(":")[0].strip()] = " ".join(comment)
            comment = []
    return found


def test_the_example_writes_every_field_at_the_demo_values_under_its_help():
    text = runconfig.example({"train_path": "train.jsonl"})
    loaded = yaml.safe_load(text)
    assert loaded["model"] == dataclasses.asdict(runconfig.ModelConfig())
    assert loaded["training"] == dataclasses.asdict(runconfig.DEMO_TRAINING)
    assert loaded["plan"] == runconfig.DEMO_PLAN and loaded["data"] == {"train_path": "train.jsonl"}
    for section, cls in (("model", runconfig.ModelConfig), ("training", runconfig.TrainingConfig)):
        comments = _commented(text, section)
        assert comments == {f.name: runconfig.field_help(cls, f.name) for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class _Spec:  # shaped like DataSpec: a required path, fields with and without help
    train_path: str = field(metadata={"help": "The training file"})
    max_length: int = field(default=512, metadata={"help": "Tokens per example; longer examples are cut"})
    columns: dict = field(default_factory=dict)
    packing: bool = False


def test_the_example_takes_the_data_fields_defaults_and_help_where_they_carry_it():
    text = runconfig.example({"train_path": "train.jsonl", "packing": True}, data_fields=_Spec)
    assert yaml.safe_load(text)["data"] == {"train_path": "train.jsonl", "max_length": 512, "columns": {},
                                            "packing": True}
    assert _commented(text, "data") == {"train_path": "The training file",
                                        "max_length": "Tokens per example; longer examples are cut",
                                        "columns": "", "packing": ""}
def test_a_run_in_epochs_leaves_its_step_twins_out_and_old_files_keep_their_steps(tmp_path):
    base = "plan: {targets: q_proj}\ndata: {train_path: x}\n"
    old = runconfig.load(write(tmp_path, base))
    assert (old.training.max_steps, old.training.epochs, old.training.eval_every) == (100, None, 25)
    text = base + "training: {epochs: 3, eval_every_epochs: 0.5, save_every_epochs: 1}\n"
    config = runconfig.load(write(tmp_path, text))
    t = config.training
    assert (t.max_steps, t.epochs, t.eval_every, t.eval_every_epochs, t.save_every, t.save_every_epochs) == (
        None, 3.0, None, 0.5, None, 1.0)
    again = tmp_path / "again.yaml"
    runconfig.save(config, again)
    assert runconfig.load(again) == config
