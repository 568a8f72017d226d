"""Every input a person can get wrong ends in one clear line: a table of bad inputs across run files, data files,
model sources, output paths, numbers and checkpoint folders, each with the message it must show.

Each row is run twice: through the CLI (`studio.cli.main` in this process, the file descriptors captured: exit code
2, nothing on stdout, exactly one line on stderr) and through the core function the CLI calls for it (the same
StudioError, whose message must be the CLI's line). A row that names a folder it must not change (a refused train
into a run, a refused resume) also checks that the folder is as it was, file by file, after both."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from studio.cli import main
from studio.core import events as ev
from studio.core import runconfig
from studio.core.adapters.folder import read_adapter_info
from studio.core.adapters.saving import export_run_adapter
from studio.core.adapters.spectrum import read_adapter_spectra
from studio.core.data.dataset import DEMO_DIR
from studio.core.errors import StudioError
from studio.core.model import inventory
from studio.core.model.loading import open_model, require_weights
from studio.core.model.memory import estimate
from studio.core.model.plan import LoraPlan, check_values, count, validate
from studio.core.train.engine import resume, train
from studio.core.train.preflight import check_run


@dataclass(frozen=True)
class Case:
    argv: list[str]  # the CLI invocation, run in `cwd`
    message: str  # what its one line must say
    core: Callable[[], object] | None  # the core call behind it: raises the StudioError (or returns a Failed event)
    cwd: Path | None = None
    untouched: Path | None = None  # a folder neither the CLI nor the core call may change


class World:
    """The files the rows point at, made once: a tiny model, good data, a finished run; `fresh()` for the rest."""

    def __init__(self, root: Path, tiny: Path, run: Path) -> None:
        self.root, self.tiny, self.run = root, tiny, run
        self.mounts: list[Path] = []
        self.rows = (DEMO_DIR / "train.jsonl").read_text().splitlines()[:6]
        self.good_data = self.file("good.jsonl", "\n".join(self.rows) + "\n")
        self.count = 0

    def fresh(self) -> Path:
        self.count += 1
        folder = self.root / f"case-{self.count}"
        folder.mkdir()
        return folder

    def file(self, name: str, content: str | bytes, folder: Path | None = None) -> Path:
        path = (folder or self.root) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def run_file(self, text: str | bytes | None = None, **sections) -> Path:
        """A run file in a fresh folder: `text` as given, or the good run with `sections` merged in."""
        folder = self.fresh()
        if text is None:
            run = {"model": {"source": str(self.tiny), "device": "cpu"}, "plan": {"targets": "q_proj", "rank": 2},
                   "data": {"train_path": str(self.good_data), "format": "instruction", "max_length": 64},
                   "training": {"max_steps": 1, "batch_size": 2}}
            for key, value in sections.items():
                run[key] = {**run[key], **value} if isinstance(value, dict) and isinstance(run.get(key), dict) \
                    else value
            text = yaml.safe_dump(run)
        return self.file("run.yaml", text, folder)

    def data_run(self, name: str, content: str | bytes, **data) -> Path:
        """A run file whose training data is `content` under `name`."""
        folder = self.fresh()
        path = self.file(name, content, folder)
        return self.run_file(data={"train_path": str(path), **data})

    def copy_of_run(self) -> Path:
        target = self.fresh() / "run"
        shutil.copytree(self.run, target)
        return target


def train_case(run_file: Path, message: str) -> Case:
    return Case(["train", str(run_file)], message, lambda: check_run(runconfig.load(run_file)))


def model_case(argv: list[str], message: str, spec: str, **options) -> Case:
    return Case(argv, message, lambda: open_model(spec, **options))


def count_case(w: World, args: list[str], message: str, core: Callable[[], object]) -> Case:
    return Case(["count", str(w.tiny), "--targets", "q_proj", *args], message, core)


def plan_check(**fields) -> Callable[[], object]:
    return lambda: check_values(LoraPlan(targets=("model.layers.0.self_attn.q_proj",), **fields))


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _read_only_folder(w: World) -> Path | None:
    """A folder this process cannot write into: a read-only tmpfs mount as root, else a folder without write
    permission; None where neither can be had."""
    folder = w.fresh() / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o500)
        return folder
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        return None
    w.mounts.append(folder)
    return folder


# -- the table: (name, row) where row(world) -> Case ----------------------------------------------------------------
RUN_FILES: dict[str, Callable[[World], Case]] = {
    "run: scalar where the model mapping belongs": lambda w: train_case(
        w.run_file(model=5), "`model` must be a mapping of fields, got 5"),
    "run: scalar where the plan mapping belongs": lambda w: train_case(
        w.run_file(plan="q_proj"), "`plan` must be a mapping of fields, got 'q_proj'"),
    "run: scalar where the data mapping belongs": lambda w: train_case(
        w.run_file(data="train.jsonl"), "`data` must be a mapping of fields, got 'train.jsonl'"),
    "run: scalar where the training mapping belongs": lambda w: train_case(
        w.run_file(training=100), "`training` must be a mapping of fields, got 100"),
    "run: a list instead of a mapping": lambda w: train_case(
        w.run_file("- model\n- plan\n"), "a run file must be a mapping with model, plan, data and training sections"),
    "run: null number": lambda w: train_case(
        w.run_file(training={"batch_size": None}), "training.batch_size must be a number, got null"),
    "run: neither steps nor epochs": lambda w: train_case(
        w.run_file(training={"max_steps": None}),
        "training: give max_steps (optimizer steps) or epochs (passes over the data)"),
    "run: both steps and epochs": lambda w: train_case(
        w.run_file(training={"max_steps": 10, "epochs": 2}), "training: give max_steps or epochs, not both"),
    "run: infinite learning rate": lambda w: train_case(
        w.run_file(training={"learning_rate": float("inf")}),
        "training.learning_rate must be a finite number, got inf"),
    "run: NaN learning rate": lambda w: train_case(
        w.run_file(training={"learning_rate": float("nan")}),
        "training.learning_rate must be a finite number, got nan"),
    "run: negative learning rate": lambda w: train_case(
        w.run_file(training={"learning_rate": -0.001}), "training.learning_rate must be a positive number, got -0.001"),
    "run: negative batch size": lambda w: train_case(
        w.run_file(training={"batch_size": -4}), "training.batch_size must be at least 1"),
    "run: fractional step count": lambda w: train_case(
        w.run_file(training={"max_steps": 2.5}), "training.max_steps must be a whole number, got 2.5"),
    "run: true as a number": lambda w: train_case(
        w.run_file(training={"batch_size": True}), "training.batch_size must be a number, got true"),
    "run: text as a number": lambda w: train_case(
        w.run_file(training={"batch_size": "lots"}), "training.batch_size must be a number, got 'lots'"),
    "run: a list as a number": lambda w: train_case(
        w.run_file(training={"learning_rate": [1, 2]}), "training.learning_rate must be a number, got [1, 2]"),
    "run: text as true/false": lambda w: train_case(
        w.run_file(training={"gradient_checkpointing": "sometimes"}),
        "training.gradient_checkpointing must be true or false, got 'sometimes'"),
    "run: negative checkpoints kept": lambda w: train_case(
        w.run_file(training={"keep_checkpoints": -1}), "training.keep_checkpoints must be >= 0"),
    "run: warmup ratio over 1": lambda w: train_case(
        w.run_file(training={"warmup_ratio": 1.5}), "training.warmup_ratio must be in [0, 1)"),
    "run: unknown top-level key": lambda w: train_case(
        w.run_file(modle={"source": "default"}), "unknown field `modle` in the run file: did you mean `model`?"),
    "run: unknown training key": lambda w: train_case(
        w.run_file(training={"max_stepz": 3}), "unknown field `max_stepz` in training: did you mean `max_steps`?"),
    "run: unknown model key": lambda w: train_case(
        w.run_file(model={"sourse": "default"}), "unknown field `sourse` in model: did you mean `source`?"),
    "run: unknown plan key": lambda w: train_case(
        w.run_file(plan={"rnak": 4}), "unknown plan field `rnak`: did you mean `rank`?"),
    "run: unknown data key": lambda w: train_case(
        w.run_file(data={"max_len": 64}), "unknown data setting `max_len`: did you mean `max_length`?"),
    "run: misspelt train_path": lambda w: train_case(
        w.run_file(f"plan: {{targets: q_proj}}\ndata: {{trian_path: {w.good_data}}}\n"),
        "data.train_path is missing: the training file to read (is data.trian_path meant to be train_path?)"),
    "run: misspelt schedule": lambda w: train_case(
        w.run_file(training={"schedule": "cosin"}), "training.schedule cannot be 'cosin': did you mean `cosine`?"),
    "run: misspelt task": lambda w: train_case(
        w.run_file(model={"task": "seq_cls"}), "model.task cannot be 'seq_cls': did you mean `seq-cls`?"),
    "run: unknown device": lambda w: train_case(
        w.run_file(model={"device": "gpu"}), "model.device: use auto, cpu, cuda or cuda:N, got 'gpu'"),
    "run: non-UTF-8 bytes": lambda w: train_case(
        w.run_file(b"plan: {targets: q_proj}\nrun_name: caf\xe9\n"), "is not UTF-8 text (byte 0xe9 on line 2)"),
    "run: broken YAML names its line": lambda w: train_case(
        w.run_file("plan:\n  targets: [q_proj\ndata: {train_path: x}\n"), "is not valid YAML at line 3"),
    "run: a tab in the indentation": lambda w: train_case(
        w.run_file("plan:\n\ttargets: q_proj\n"), "is not valid YAML at line 2"),
    "run: empty run file": lambda w: train_case(
        w.run_file(""), "is empty: write a run file with `lora-studio init-run`"),
    "run: missing run file": lambda w: train_case(w.fresh() / "run.yaml", "cannot read the run file"),
    "run: a folder as the run file": lambda w: train_case(w.fresh(), "Is a directory"),
    "run: rank 0": lambda w: train_case(w.run_file(plan={"rank": 0}), "rank must be at least 1, got 0"),
    "run: alpha 0": lambda w: train_case(w.run_file(plan={"alpha": 0}), "alpha must be positive, got 0"),
    "run: negative alpha": lambda w: train_case(w.run_file(plan={"alpha": -8}), "alpha must be positive, got -8"),
    "run: text as the rank": lambda w: train_case(
        w.run_file(plan={"rank": "eight"}), "plan.rank must be a whole number, got 'eight'"),
    "run: dropout over 1": lambda w: train_case(
        w.run_file(plan={"dropout": 1.5}), "dropout must be in [0, 1), got 1.5"),
    "run: a number as the targets": lambda w: train_case(
        w.run_file(plan={"targets": 5}), "plan.targets must be a preset, a comma-separated spec or a list of "
                                         "modules, got 5"),
    "run: misspelt variant": lambda w: train_case(
        w.run_file(plan={"variant": "lorra"}), "unknown variant 'lorra': did you mean `lora`?"),
    "run: one label for a classifier": lambda w: train_case(
        w.run_file(model={"task": "seq-cls", "num_labels": 1}), "model.num_labels must be at least 2 for seq-cls"),
    "run: a list as the run name": lambda w: train_case(
        w.run_file(run_name=["a"]), "run_name must be text, got ['a']"),
}

DATA_FILES: dict[str, Callable[[World], Case]] = {
    "data: empty file": lambda w: train_case(w.data_run("train.jsonl", ""), "train.jsonl holds no rows"),
    "data: not JSON": lambda w: train_case(
        w.data_run("train.jsonl", "just some notes\nmore notes\n"),
        "train.jsonl has no readable row: row 1 is not valid JSON (Expecting value at column 1)"),
    "data: .json that is not JSON": lambda w: train_case(
        w.data_run("train.json", "{'prompt': 1}"), "train.json, line 1: not valid JSON"),
    "data: a missing column": lambda w: train_case(
        w.data_run("train.jsonl", '{"prompt": "a"}\n'), "the instruction format needs a response column"),
    "data: a misspelt column": lambda w: train_case(
        w.data_run("train.jsonl", '{"prompt": "a", "respnse": "b"}\n'),
        "the data has prompt, respnse: is `respnse` the response column? map it explicitly"),
    "data: a mapped column that is not there": lambda w: train_case(
        w.data_run("train.jsonl", '{"prompt": "a", "response": "b"}\n', columns={"response": "answr"}),
        "the response column 'answr' is not in the data; its columns: prompt, response"),
    "data: columns of no format": lambda w: train_case(
        w.data_run("train.jsonl", '{"foo": "a", "bar": "b"}\n', format="auto"),
        "cannot tell the format from the columns foo, bar"),
    "data: random bytes as Parquet": lambda w: train_case(
        w.data_run("train.parquet", bytes(range(256)) * 8), "train.parquet as Parquet"),
    "data: a folder without text files": lambda w: train_case(
        _folder_run(w, {"notes.md": "# notes"}), "holds no .txt files"),
    "data: labels beyond num_labels": lambda w: train_case(
        _classification_run(w, [0, 1, 2, 3, 4], num_labels=2),
        "the data has 5 classes (0, 1, 2, 3, 4) but model.num_labels is 2: set model.num_labels to 5"),
    "data: more class names than num_labels": lambda w: train_case(
        _classification_run(w, ["good", "bad", "ugly"], num_labels=2),
        "the data has 3 classes (bad, good, ugly) but model.num_labels is 2: set model.num_labels to 3"),
    "data: deeply nested JSON": lambda w: train_case(
        w.data_run("train.json", _nested(100_000)), "train.json is nested too deeply to read"),
    "data: a deeply nested JSON line": lambda w: train_case(
        w.data_run("train.jsonl", _nested(100_000) + "\n"), "train.jsonl has no readable row: row 1 is nested too "
                                                             "deeply to read"),
    "data: missing file": lambda w: train_case(
        w.run_file(data={"train_path": str(w.root / "nope.jsonl")}), "no such file or folder"),
    "data: unsupported file type": lambda w: train_case(
        w.data_run("train.xlsx", b"PK\x03\x04"), "train.xlsx: unsupported file type"),
    "data: CSV with a header only": lambda w: train_case(
        w.data_run("train.csv", "prompt,response\n"), "train.csv holds no rows"),
    "data: CSV rows longer than the header": lambda w: train_case(
        w.data_run("train.csv", "prompt,response\na,b,c\nd,e,f\n"),
        "train.csv has no readable row: row 2 has 3 fields, the header has 2"),
    "data: non-UTF-8 JSON": lambda w: train_case(
        w.data_run("train.json", b'[{"prompt": "caf\xe9"}]'), "train.json, line 1: not valid UTF-8"),
    "data: a JSON number": lambda w: train_case(
        w.data_run("train.json", "42"), "train.json holds a JSON int; expected a list of rows"),
    "data: JSON lines that are lists": lambda w: train_case(
        w.data_run("train.jsonl", "[1, 2]\n[3]\n"), "has no readable row: row 1 is a JSON list, expected an object"),
    "data: misspelt format": lambda w: train_case(
        w.run_file(data={"format": "chatt"}), "unknown data format 'chatt': did you mean `chat`?"),
    "data: max_length 1": lambda w: train_case(
        w.run_file(data={"max_length": 1}), "max_length must be an integer of at least 2, not 1"),
    "data: missing validation file": lambda w: train_case(
        w.run_file(data={"val_path": str(w.root / "nope-val.jsonl")}), "no such file or folder"),
    "data: classification data for a causal LM": lambda w: train_case(
        _classification_run(w, [0, 1], num_labels=2, task="causal-lm"),
        "holds classification data (text and label): set model.task to seq-cls"),
    "data: instruction data for a classifier": lambda w: train_case(
        w.run_file(model={"task": "seq-cls"}), "model.task seq-cls trains a classifier on text and label columns"),
    "data: a number as the path": lambda w: train_case(
        w.run_file(data={"train_path": 5}), "data.train_path must be a file or folder path, got 5"),
    "data: a single word as label names": lambda w: train_case(
        w.run_file(data={"label_names": "pos"}), "data.label_names must be a list of class names, got 'pos'"),
    "data: validation fraction over 1": lambda w: train_case(
        w.run_file(data={"val_fraction": 1.5}), "val_fraction must be at least 0 and below 1, not 1.5"),
}


def _folder_run(w: World, files: dict[str, str]) -> Path:
    folder = w.fresh() / "texts"
    for name, text in files.items():
        w.file(name, text, folder)
    return w.run_file(data={"train_path": str(folder), "format": "text"})


def _classification_run(w: World, labels: list, *, num_labels: int, task: str = "seq-cls") -> Path:
    folder = w.fresh()
    rows = "".join(json.dumps({"text": f"example {i}", "label": label}) + "\n" for i, label in enumerate(labels))
    data = w.file("train.jsonl", rows, folder)
    return w.run_file(model={"task": task, "num_labels": num_labels},
                      data={"train_path": str(data), "format": "classification"})


def _config_folder(w: World, config: dict | str, name: str = "config.json") -> Path:
    folder = w.fresh()
    w.file(name, config if isinstance(config, str) else json.dumps(config), folder)
    return folder / name


LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
         "num_hidden_layers": 2, "vocab_size": 100}


def _torn_weights(w: World) -> Path:
    folder = w.fresh() / "torn"
    shutil.copytree(w.tiny, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    return folder


def _torn_adapter(w: World) -> Path:
    folder = w.fresh() / "adapter"
    shutil.copytree(w.run / "adapter", folder)
    (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    return folder


MODEL_SOURCES: dict[str, Callable[[World], Case]] = {
    "model: missing path": lambda w: model_case(
        ["inspect", "./no/such/model"], "no such file or folder: ./no/such/model", "./no/such/model", plan_only=True),
    "model: empty folder": lambda w: (lambda f: model_case(
        ["inspect", str(f)], "holds no config.json, weights or .gguf file", str(f), plan_only=True))(w.fresh()),
    "model: torn safetensors": lambda w: (lambda f: model_case(
        ["generate", str(f), "--prompt", "hi"], "cannot load the weights of torn", str(f)))(_torn_weights(w)),
    "model: negative sizes in a config": lambda w: (lambda f: model_case(
        ["inspect", str(f)], "config.json: hidden_size is -64; a size or count must be positive", str(f),
        plan_only=True))(_config_folder(w, {**LLAMA, "hidden_size": -64})),
    "model: negative layer count in a config": lambda w: (lambda f: model_case(
        ["inspect", str(f)], "config.json: num_hidden_layers is -2; a size or count must be positive", str(f),
        plan_only=True))(_config_folder(w, {**LLAMA, "num_hidden_layers": -2})),
    "model: plan mode where weights are needed (generate)": lambda w: (lambda f: Case(
        ["generate", str(f), "--prompt", "hi"], "is open in plan mode (no weights): open it with its weights to "
        "generate", lambda: require_weights(open_model(str(f)), "generate")))(_config_folder(w, LLAMA)),
    "model: plan mode where weights are needed (train)": lambda w: train_case(
        w.run_file(model={"source": str(_config_folder(w, LLAMA))}), "config.json is a bare config (plan mode, no "
        "weights): point model.source at a folder with weights"),
    "model: a config that is not JSON": lambda w: (lambda f: model_case(
        ["inspect", str(f)], "is not a readable JSON file", str(f), plan_only=True))(
        _config_folder(w, "{model_type: llama")),
    "model: a config without model_type": lambda w: (lambda f: model_case(
        ["inspect", str(f)], "has no `model_type`, so the architecture is unknown", str(f), plan_only=True))(
        _config_folder(w, {"hidden_size": 64})),
    "model: an unknown model_type": lambda w: (lambda f: model_case(
        ["inspect", str(f)], "unknown model_type 'bogus'", str(f), plan_only=True))(
        _config_folder(w, {"model_type": "bogus"})),
    "model: a text file": lambda w: (lambda f: model_case(
        ["inspect", str(f)], "is neither a .gguf file nor a config.json", str(f), plan_only=True))(
        w.file("model.txt", "weights", w.fresh())),
    "model: two .gguf files in a folder": lambda w: (lambda f: model_case(
        ["inspect", str(f)], "holds several .gguf files (a.gguf, b.gguf): open one of them", str(f),
        plan_only=True))(_two_ggufs(w)),
    "model: random bytes as .gguf": lambda w: (lambda f: model_case(
        ["inspect", str(f)], "cannot read broken.gguf as a GGUF model", str(f), plan_only=True))(
        w.file("broken.gguf", bytes(range(256)) * 4, w.fresh())),
    "model: missing source in a run file": lambda w: train_case(
        w.run_file(model={"source": str(w.root / "gone")}), "no such file or folder"),
    "model: an adapter that is not one": lambda w: train_case(
        w.run_file(model={"adapter": str(w.fresh())}, plan={}), "is not a PEFT adapter folder: it has no "
                                                               "adapter_config.json"),
    "model: a torn adapter (spectrum)": lambda w: (lambda f: Case(
        ["spectrum", str(f)], "adapter_model.safetensors is damaged or not a weights file",
        lambda: read_adapter_spectra(f)))(_torn_adapter(w)),
    "model: a torn adapter (generate)": lambda w: (lambda f: Case(
        ["generate", str(w.tiny), "--adapter", str(f), "--prompt", "hi"],
        "adapter_model.safetensors is damaged or not a weights file", lambda: read_adapter_info(f)))(_torn_adapter(w)),
    "model: one label for a classifier": lambda w: model_case(
        ["inspect", str(w.tiny), "--task", "seq-cls", "--num-labels", "1"],
        "a classification model needs at least 2 labels", str(w.tiny), task="seq-cls", num_labels=1, plan_only=True),
}


def _two_ggufs(w: World) -> Path:
    folder = w.fresh()
    w.file("a.gguf", b"GGUF", folder)
    w.file("b.gguf", b"GGUF", folder)
    return folder


def _inside_a_file(w: World) -> Path:
    return w.file("notes.txt", "a person's notes", w.fresh()) / "out"


def _read_only_case(w: World) -> Case:
    folder = _read_only_folder(w)
    if folder is None:
        pytest.skip("no read-only folder here: not root-free chmod, and tmpfs cannot be mounted")
    out = folder / "adapter"
    return Case(["export", str(w.run), "--out", str(out)], f"cannot write the adapter to {out}",
                lambda: export_run_adapter(w.run, out))


def _export_into_cwd(w: World) -> Case:
    cwd = w.fresh()
    w.file("thesis.docx", "years of work", cwd)
    return Case(["export", str(w.run), "--out", "."],
                f"the current folder {cwd.resolve()} holds files the studio did not write (thesis.docx): choose a new "
                "or empty folder for the adapter, or use --force to write beside them (they are kept)",
                lambda: export_run_adapter(w.run, cwd), cwd=cwd, untouched=cwd)


def _export_into_its_run(w: World) -> Case:
    run = w.copy_of_run()
    return Case(["export", str(run), "--out", str(run)],
                f"{run} is a run folder: write the adapter to a new folder (one inside it is fine, e.g. "
                f"{run / 'export'})",
                lambda: export_run_adapter(run, run), untouched=run)


def _run_dir_is_a_file(w: World) -> Case:
    run_file = w.run_file()
    target = w.file("taken", "a person's file", w.fresh())
    return Case(["train", str(run_file), "--run-dir", str(target)],
                f"cannot write the run folder {target}: {target} is a file, not a folder",
                lambda: train(runconfig.load(run_file), run_dir=target))


def _run_dir_inside_a_file(w: World) -> Case:
    run_file, target = w.run_file(), _inside_a_file(w)
    return Case(["train", str(run_file), "--run-dir", str(target)],
                f"cannot write the run folder {target}: {target.parent} is a file, not a folder",
                lambda: train(runconfig.load(run_file), run_dir=target))


def _train_into_a_run(w: World) -> Case:
    run_file, run = w.run_file(), w.copy_of_run()
    return Case(["train", str(run_file), "--run-dir", str(run)],
                f"{run} holds a run already: resume it (lora-studio resume {run}) or choose a new run folder",
                lambda: train(runconfig.load(run_file), run_dir=run), untouched=run)


OUTPUT_PATHS: dict[str, Callable[[World], Case]] = {
    "output: export inside a file": lambda w: (lambda out: Case(
        ["export", str(w.run), "--out", str(out)], "notes.txt is a file, not a folder",
        lambda: export_run_adapter(w.run, out)))(_inside_a_file(w)),
    "output: merge inside a file": lambda w: (lambda out: Case(
        ["merge", str(w.run), "--out", str(out)], "notes.txt is a file, not a folder", None))(_inside_a_file(w)),
    "output: GGUF inside a file": lambda w: (lambda out: Case(
        ["export-gguf", str(w.run), "--out", str(out / "model.gguf")], "notes.txt is a file, not a folder",
        None))(_inside_a_file(w)),
    "output: export without permission": _read_only_case,
    "output: train into a file": _run_dir_is_a_file,
    "output: train inside a file": _run_dir_inside_a_file,
    "output: train into an existing run": _train_into_a_run,
    "output: init-run inside a file": lambda w: (lambda out: Case(
        ["init-run", str(out / "run.yaml")], f"cannot write {out / 'run.yaml'}: {out.parent} is a file, not a folder",
        None))(_inside_a_file(w)),
    "output: export into the current folder": _export_into_cwd,
    "output: export into the run folder itself": _export_into_its_run,
}

NUMBERS: dict[str, Callable[[World], Case]] = {
    "number: --max-new-tokens 0": lambda w: Case(
        ["generate", str(w.tiny), "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, "
        "got 0", None),
    "number: negative --max-new-tokens": lambda w: Case(
        ["generate", str(w.tiny), "--prompt", "hi", "--max-new-tokens", "-5"], "--max-new-tokens must be at least 1, "
        "got -5", None),
    "number: rank 0": lambda w: count_case(w, ["--rank", "0"], "rank must be at least 1, got 0", plan_check(rank=0)),
    "number: negative rank": lambda w: count_case(
        w, ["--rank", "-4"], "rank must be at least 1, got -4", plan_check(rank=-4)),
    "number: alpha 0": lambda w: count_case(
        w, ["--alpha", "0"], "alpha must be positive, got 0", plan_check(alpha=0.0)),
    "number: negative alpha": lambda w: count_case(
        w, ["--alpha", "-2"], "alpha must be positive, got -2", plan_check(alpha=-2.0)),
    "number: dropout 1": lambda w: count_case(
        w, ["--dropout", "1"], "dropout must be in [0, 1), got 1.0", plan_check(dropout=1.0)),
    "number: a per-module rank of 0": lambda w: count_case(
        w, ["--rank-override", "model.layers.0.self_attn.q_proj=0"],
        "the rank of model.layers.0.self_attn.q_proj must be at least 1, got 0",
        plan_check(rank_overrides={"model.layers.0.self_attn.q_proj": 0})),
    "number: a rank larger than the module": lambda w: count_case(
        w, ["--rank", "1000"], "rank 1000 is larger than model.layers.0.self_attn.q_proj (32→32)",
        lambda: _validate_on_tiny(w, rank=1000)),
    "number: batch size 0 for the estimate": lambda w: count_case(
        w, ["--batch-size", "0"], "the batch size must be at least 1, got 0", lambda: _estimate_on_tiny(w, batch=0)),
    "number: sequence length 0 for the estimate": lambda w: count_case(
        w, ["--seq-len", "0"], "the sequence length must be at least 1, got 0",
        lambda: _estimate_on_tiny(w, seq_len=0)),
    "number: --max-steps 0": lambda w: (lambda run_file: Case(
        ["train", str(run_file), "--max-steps", "0"], "training.max_steps must be at least 1",
        lambda: runconfig.RunConfig.from_dict({**yaml.safe_load(run_file.read_text()), "training": {"max_steps": 0}})
    ))(w.run_file()),
    "number: a rank override without a rank": lambda w: count_case(
        w, ["--rank-override", "q_proj"], "--rank-override wants MODULE=RANK, got 'q_proj'", None),
}


def _tree_of_tiny(w: World):
    return inventory.build(open_model(str(w.tiny), plan_only=True).model)


def _validate_on_tiny(w: World, **fields) -> None:
    tree = _tree_of_tiny(w)
    validate(tree, LoraPlan(targets=tuple(inventory.select(tree, "q_proj")), **fields))


def _estimate_on_tiny(w: World, batch: int = 1, seq_len: int = 512) -> None:
    tree = _tree_of_tiny(w)
    plan = LoraPlan(targets=tuple(inventory.select(tree, "q_proj")))
    estimate(tree, plan, count(tree, plan), batch_size=batch, seq_len=seq_len)


def _run_with_only(w: World, name: str, *, adapter: bool) -> Path:
    """A copy of the finished run whose only checkpoint folder is named `name` (a person's copy of one)."""
    run = w.copy_of_run()
    checkpoints = sorted((run / "checkpoints").iterdir())
    checkpoints[-1].rename(run / "checkpoints" / name)
    for other in checkpoints[:-1]:
        shutil.rmtree(other)
    if not adapter:
        shutil.rmtree(run / "adapter")
    return run


def _resume_to(w: World, max_steps: int, message: str) -> Case:
    """`resume --max-steps` on a copy of the finished run (4 steps, its one checkpoint at step 2)."""
    run = w.copy_of_run()
    return Case(["resume", str(run), "--max-steps", str(max_steps)], message.format(run=run),
                lambda: resume(run, max_steps=max_steps), untouched=run)


AT_THE_CHECKPOINT = "the latest checkpoint of {run} is at step 2: a resume needs more than 2 steps to train " \
                    "(max steps is "

CHECKPOINTS: dict[str, Callable[[World], Case]] = {
    "checkpoint: resume --max-steps at the last checkpoint": lambda w: _resume_to(w, 2, AT_THE_CHECKPOINT + "2)"),
    "checkpoint: resume --max-steps below the last checkpoint": lambda w: _resume_to(w, 1, AT_THE_CHECKPOINT + "1)"),
    "checkpoint: resume --max-steps below the finished step": lambda w: _resume_to(
        w, 3, "{run} finished at step 4: resuming it to step 3 would replace its adapter with an earlier one; give at "
              "least 4 steps, or export it first"),
    "checkpoint: resume when the only checkpoint is `step-20 copy`": lambda w: (lambda run: Case(
        ["resume", str(run)], "has no checkpoint to resume from", lambda: resume(run)))(
        _run_with_only(w, "step-20 copy", adapter=True)),
    "checkpoint: export when the only adapter is in `step-20 copy`": lambda w: (lambda run: Case(
        ["export", str(run)], "holds no adapter yet: train it first", lambda: export_run_adapter(run, run / "x")))(
        _run_with_only(w, "step-20 copy", adapter=False)),
    "checkpoint: spectrum when the only checkpoint is `step-x`": lambda w: (lambda run: Case(
        ["spectrum", str(run)], "no such adapter folder", lambda: read_adapter_spectra(run / "adapter")))(
        _run_with_only(w, "step-x", adapter=False)),
}

TABLE = {**RUN_FILES, **DATA_FILES, **MODEL_SOURCES, **OUTPUT_PATHS, **NUMBERS, **CHECKPOINTS}


def test_the_table_holds_at_least_sixty_bad_inputs_across_every_category():
    assert len(TABLE) >= 60
    categories = {name.split(":")[0] for name in TABLE}
    assert categories == {"run", "data", "model", "output", "number", "checkpoint"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_folder):
    root = tmp_path_factory.mktemp("bad-inputs")
    rows = (DEMO_DIR / "train.jsonl").read_text().splitlines()[:4]
    (root / "run-data.jsonl").write_text("\n".join(rows) + "\n")
    config = runconfig.RunConfig.from_dict({
        "model": {"source": str(tiny_model_folder), "device": "cpu"}, "plan": {"targets": "q_proj", "rank": 2},
        "data": {"train_path": str(root / "run-data.jsonl"), "format": "instruction", "max_length": 64},
        "training": {"max_steps": 4, "batch_size": 2, "save_every": 2, "spectrum_every": 0, "eval_every": 0},
    })
    finished = train(config, run_dir=root / "finished-run")
    assert isinstance(finished, ev.Finished), finished
    world = World(root, tiny_model_folder, root / "finished-run")
    yield world
    for mount in world.mounts:
        subprocess.run(["umount", str(mount)], check=True)


def _params(table: dict) -> list:
    return [pytest.param(*row.values, marks=row.marks, id=name) if hasattr(row, "marks") else pytest.param(row, id=name)
            for name, row in table.items()]


@pytest.mark.parametrize("row", _params(TABLE))
def test_a_bad_input_ends_in_one_clear_line(row, world, capfd, monkeypatch):
    case = row(world)
    monkeypatch.chdir(case.cwd or world.root)
    before = _snapshot(case.untouched)
    capfd.readouterr()
    code = _exit_code(case.argv)
    out, err = capfd.readouterr()
    assert code == 2, f"exit {code}; stderr: {err}"
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("lora-studio: "), err
    line = err.removeprefix("lora-studio: ").rstrip("\n")
    assert case.message in line
    if case.core is not None:
        try:
            result = case.core()
        except StudioError as exc:
            assert str(exc) == line
        else:
            assert isinstance(result, ev.Failed), f"the core accepted what the CLI refused: {result!r}"
            assert line.startswith(result.message)
    assert _snapshot(case.untouched) == before


def _snapshot(folder: Path | None) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder`: (size, modification time); {} for none."""
    if folder is None:
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
