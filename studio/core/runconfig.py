"""The run file: everything a training run needs (model, plan, data, hyperparameters), as the GUI saves it and
`lora-studio train run.yaml` runs it. Loaded with clear one-line errors naming the field that is wrong."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from studio.core.errors import RunConfigError, did_you_mean
from studio.core.files import write_atomic


def _help(text: str) -> dict[str, str]:
    """A field's help, PEFT's way (`metadata={"help": ...}`): the CLI help, the window's tooltips and the commented
    example run file are all made from it."""
    return {"help": text}


@dataclass(frozen=True)
class ModelConfig:
    source: str = field(default="default", metadata=_help(
        "default (the built-in SmolLM2-135M-Instruct), a model folder, a .gguf file, a config.json (plan mode, no "
        "weights) or a hub id"))
    task: str = field(default="causal-lm", metadata=_help(
        "causal-lm (next-token prediction) or seq-cls (sequence classification: set num_labels)"))
    num_labels: int = field(default=2, metadata=_help("Classes for seq-cls"))
    dtype: str | None = field(default=None, metadata=_help(
        "The weights' precision (float32, bfloat16, float16); null: float32 on the CPU, bfloat16 on CUDA"))
    device: str = field(default="auto", metadata=_help(
        "auto picks the first CUDA GPU, else the CPU; or name one (cpu, cuda, cuda:1)"))
    quantization: str | None = field(default=None, metadata=_help(
        "4bit or 8bit base weights for QLoRA (CUDA with bitsandbytes); null: none"))
    trust_remote_code: bool = field(default=False, metadata=_help(
        "Run the model's own Python code from its repository (only for models you trust)"))
    adapter: str | None = field(default=None, metadata=_help(
        "A PEFT adapter folder to keep training (its targets and ranks win over the plan)"))


@dataclass(frozen=True)
class TrainingConfig:
    learning_rate: float = field(default=2e-4, metadata=_help(
        "AdamW's learning rate; LoRA usually wants 1e-4 to 2e-3"))
    max_steps: int | None = field(default=100, metadata=_help(
        "Optimizer steps; epochs follow from the data size and batch (null when the run is given in epochs)"))
    epochs: float | None = field(default=None, metadata=_help(
        "Passes over the training data, instead of max_steps (give one of them); the steps they mean follow from "
        "the prepared data, the batch size, gradient accumulation and the number of processes"))
    batch_size: int = field(default=8, metadata=_help("Examples per micro-batch"))
    gradient_accumulation: int = field(default=1, metadata=_help("Micro-batches per optimizer step"))
    warmup_ratio: float = field(default=0.05, metadata=_help(
        "Share of the steps over which the learning rate ramps up from zero"))
    schedule: str = field(default="cosine", metadata=_help(
        "The learning rate after warmup: cosine, linear or constant"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW's weight decay"))
    max_grad_norm: float = field(default=1.0, metadata=_help(
        "Gradients are clipped to this norm; 0 turns clipping off"))
    optimizer: str = field(default="adamw", metadata=_help("adamw, or adamw-8bit (bitsandbytes, CUDA)"))
    precision: str = field(default="auto", metadata=_help("Mixed precision: auto, no, bf16 or fp16"))
    gradient_checkpointing: bool = field(default=False, metadata=_help(
        "Recompute activations in the backward pass instead of keeping them: less memory, slower steps"))
    seed: int = field(default=0, metadata=_help("Seeds the data order, dropout and the adapter's initialisation"))
    eval_every: int | None = field(default=25, metadata=_help(
        "Steps between validation runs (the run always ends with one); 0: at the end only"))
    eval_every_epochs: float | None = field(default=None, metadata=_help(
        "Evaluate every this many epochs (e.g. 0.5), instead of eval_every steps"))
    eval_examples: int = field(default=64, metadata=_help(
        "Validation examples scored by generation (exact match or accuracy) per evaluation; 0 reports the "
        "validation loss only"))
    save_every: int | None = field(default=50, metadata=_help(
        "Steps between checkpoints (Pause and Stop save one too); 0 keeps only the final adapter"))
    save_every_epochs: float | None = field(default=None, metadata=_help(
        "Save a checkpoint every this many epochs, instead of save_every steps"))
    spectrum_every: int = field(default=10, metadata=_help(
        "Steps between singular-value snapshots of the adapter; 0 turns them off"))
    keep_checkpoints: int = field(default=2, metadata=_help(
        "Checkpoints kept, the newest; older ones are removed (0 keeps them all)"))
    fused_loss: bool | str = field(default="auto", metadata=_help(
        "Chunked cross-entropy without the full logits, over the tokens that carry loss only (the same math, less "
        "memory and time): true, false or auto (wherever the model's output head allows it)"))
    compile_layers: bool | str = field(default="auto", metadata=_help(
        "torch.compile each decoder layer (CUDA; the same math): true, false or auto (once a run is long enough)"))
    shared_adapter_input: bool = field(default=True, metadata=_help(
        "Adapters that read the same input (q/k/v; gate/up) compute their first product as one matmul (the same "
        "math, fewer kernels); plain LoRA (a 16-bit or 4-bit base) without dropout, not under FSDP"))
    fused_mlp_kernel: bool = field(default=True, metadata=_help(
        "On a CUDA GPU, a gated MLP whose gate and up adapters share an input computes their LoRA outputs and its "
        "SiLU·up in one kernel (the same math to bf16 rounding; checked against the MLP's own forward first)"))
    group_by_length: bool = field(default=True, metadata=_help(
        "Without packing, each micro-batch draws examples of similar lengths (less padding; which examples meet, "
        "and when, stays random from the seed)"))
    attention: str = field(default="auto", metadata=_help(
        "Attention for packed rows: auto (on a CUDA GPU varlen, else flex_attention; SDPA on the CPU), sdpa, "
        "flex_attention or varlen (no dense mask: nothing computed across packed examples)"))


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig, metadata=_help("The base model"))
    plan: dict[str, Any] = field(default_factory=dict, metadata=_help(
        "What to adapt and how (LoraPlan's fields); targets may be a preset or a module spec"))
    data: dict[str, Any] = field(default_factory=dict, metadata=_help("What to train on (DataSpec's fields)"))
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata=_help("The hyperparameters"))
    output_dir: str = field(default="runs", metadata=_help("The folder that holds the run folders"))
    run_name: str | None = field(default=None, metadata=_help(
        "The run folder's name; null: a timestamp and the model's name"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        if not isinstance(data, Mapping):
            raise RunConfigError("a run file must be a mapping with model, plan, data and training sections")
        _reject_unknown("the run file", data, {f.name for f in dataclasses.fields(cls)})
        model = _section(ModelConfig, data.get("model") or {}, "model")
        training = _section(TrainingConfig, _in_steps_or_epochs(data.get("training") or {}), "training")
        plan = _mapping(data.get("plan"), "plan")
        data_section = _mapping(data.get("data"), "data")
        if not plan.get("targets") and not model.adapter:
            raise RunConfigError("plan.targets is missing: name a preset (all-linear, attention, ...) or modules"
                                 + _misspelt("plan", plan, "targets"))
        if not data_section.get("train_path"):
            raise RunConfigError("data.train_path is missing: the training file to read"
                                 + _misspelt("data", data_section, "train_path"))
        for key in ("train_path", "val_path"):
            if data_section.get(key) is not None and not isinstance(data_section[key], str):
                raise RunConfigError(f"data.{key} must be a file or folder path, got {_shown(data_section[key])}")
        config = cls(
            model=model,
            plan=plan,
            data=data_section,
            training=training,
            output_dir=_text(data.get("output_dir"), "output_dir") or "runs",
            run_name=_text(data.get("run_name"), "run_name"),
        )
        config.check()
        return config

    def check(self) -> None:
        t = self.training
        _require(math.isfinite(t.learning_rate) and t.learning_rate > 0,
                 f"training.learning_rate must be a positive number, got {t.learning_rate:g}")
        for steps, epochs in STEPS_OR_EPOCHS.items():
            _require(getattr(t, steps) is None or getattr(t, epochs) is None,
                     f"training: give {steps} or {epochs}, not both")
        _require(t.max_steps is not None or t.epochs is not None,
                 "training: give max_steps (optimizer steps) or epochs (passes over the data)")
        _require(t.max_steps is None or t.max_steps >= 1, "training.max_steps must be at least 1")
        _require(t.epochs is None or t.epochs > 0, "training.epochs must be above 0")
        _require(t.batch_size >= 1, "training.batch_size must be at least 1")
        _require(t.gradient_accumulation >= 1, "training.gradient_accumulation must be at least 1")
        _require(0 <= t.warmup_ratio < 1, "training.warmup_ratio must be in [0, 1)")
        _require(t.weight_decay >= 0, "training.weight_decay must be >= 0")
        _one_of("training.schedule", t.schedule, ("cosine", "linear", "constant"))
        _one_of("training.optimizer", t.optimizer, ("adamw", "adamw-8bit"))
        _one_of("training.precision", t.precision, ("auto", "no", "bf16", "fp16"))
        _require(t.max_grad_norm >= 0, "training.max_grad_norm must be >= 0 (0 turns clipping off)")
        for name in ("eval_every", "save_every", "spectrum_every", "eval_examples", "keep_checkpoints",
                     "eval_every_epochs", "save_every_epochs"):
            _require(getattr(t, name) is None or getattr(t, name) >= 0, f"training.{name} must be >= 0")
        for name in ("fused_loss", "compile_layers"):
            value = getattr(t, name)
            _require(isinstance(value, bool) or value == "auto",
                     f"training.{name}: use true, false or auto, got {value!r}")
        _one_of("training.attention", t.attention, ("auto", "sdpa", "flex_attention", "varlen"))
        m = self.model
        _one_of("model.task", m.task, ("causal-lm", "seq-cls"))
        _require(m.task != "seq-cls" or m.num_labels >= 2, "model.num_labels must be at least 2 for seq-cls")
        if m.dtype is not None:
            _one_of("model.dtype", m.dtype, ("float32", "bfloat16", "float16"))
        if m.quantization is not None:
            _one_of("model.quantization", m.quantization, ("4bit", "8bit"))
        _require(m.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", m.device) is not None,
                 f"model.device: use auto, cpu, cuda or cuda:N, got {m.device!r}")


STEPS_OR_EPOCHS = {"max_steps": "epochs", "eval_every": "eval_every_epochs", "save_every": "save_every_epochs"}


def _in_steps_or_epochs(training: Any) -> Any:
    """A training section that gives a length in epochs leaves its twin in steps out (None), so that run files
    written before epochs existed keep their step defaults and one saying `epochs: 3` needs no `max_steps: null`."""
    if not isinstance(training, Mapping):
        return training
    values = dict(training)
    for steps, epochs in STEPS_OR_EPOCHS.items():
        if values.get(epochs) is not None and steps not in values:
            values[steps] = None
    return values


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise RunConfigError(message)


def _one_of(where: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        hint = did_you_mean(value, allowed) or f": use {', '.join(allowed[:-1])} or {allowed[-1]}"
        raise RunConfigError(f"{where} cannot be {value!r}{hint}")


def _shown(value: Any) -> str:
    """A value as the run file spells it: null, true, 2.5, 'text'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _reject_unknown(where: str, data: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(str(key) for key in set(data) - known)
    if unknown:
        hint = did_you_mean(unknown[0], known) or f" (known: {', '.join(sorted(known))})"
        raise RunConfigError(f"unknown field `{unknown[0]}` in {where}{hint}")


def _misspelt(where: str, data: Mapping[str, Any], wanted: str) -> str:
    """" (is `trian_path` meant to be train_path?)" when a key of `data` is a near miss for the missing one."""
    near = difflib.get_close_matches(wanted, [str(key) for key in data], n=1, cutoff=0.6)
    return f" (is {where}.{near[0]} meant to be {wanted}?)" if near else ""


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RunConfigError(f"`{where}` must be a mapping of fields, got {_shown(value)}")
    return dict(value)


def _text(value: Any, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise RunConfigError(f"{where} must be text, got {_shown(value)}")


def _section(cls: type, data: Any, where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    data = _mapping(data, where)
    _reject_unknown(where, data, set(fields))
    defaults = cls()
    return cls(**{name: _coerce(f"{where}.{name}", value, getattr(defaults, name), fields[name].type)
                  for name, value in data.items()})


def _coerce(where: str, value: Any, default: Any, annotation: Any) -> Any:
    """`value` as the type of the field (its default's, or its annotation's when the default is None);
    RunConfigError naming the field when it cannot be one."""
    kind = str(annotation)
    if "bool | str" in kind:  # true, false or auto: checked by RunConfig.check
        return value
    if value is None and "None" in kind:  # e.g. max_steps: null in a run given in epochs
        return None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RunConfigError(f"{where} must be true or false, got {_shown(value)}")
        return value
    if isinstance(default, (int, float)) or (default is None and kind.startswith(("int", "float"))):
        number = _number(where, value)
        if isinstance(default, float) or kind.startswith("float"):
            return float(number)
        if not float(number).is_integer():
            raise RunConfigError(f"{where} must be a whole number, got {_shown(value)}")
        return int(number)
    if not isinstance(value, str):
        raise RunConfigError(f"{where} must be text, got {_shown(value)}")
    return value


def _number(where: str, value: Any) -> float | int:
    """A finite number from a YAML value (a string such as "1e-4" too: YAML 1.1 reads that as text)."""
    if isinstance(value, bool) or value is None or not isinstance(value, (int, float, str)):
        raise RunConfigError(f"{where} must be a number, got {_shown(value)}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise RunConfigError(f"{where} must be a number, got {_shown(value)}") from None
    if not math.isfinite(value):
        raise RunConfigError(f"{where} must be a finite number, got {_shown(value)}")
    return value


def load(path: str | Path) -> RunConfig:
    import yaml

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RunConfigError(f"cannot read the run file {path}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise RunConfigError(f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}): save it as "
                             "UTF-8") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:  # a control character: YAML allows none but tab and line breaks
        line = text.count("\n", 0, exc.position) + 1
        raise RunConfigError(f"{path} is not valid YAML at line {line}: it holds the control character "
                             f"{chr(exc.character)!r}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RunConfigError(f"{path} is not valid YAML{where}") from exc
    except RecursionError as exc:
        raise RunConfigError(f"{path} is nested too deeply to be a run file") from exc
    if data is None:
        raise RunConfigError(f"{path} is empty: write a run file with `lora-studio init-run`")
    config = RunConfig.from_dict(data)
    return _resolve_paths(config, path.parent)


def _resolve_paths(config: RunConfig, base: Path) -> RunConfig:
    """Relative data and output paths in a run file are relative to the file, not to the current folder."""
    data = dict(config.data)
    for key in ("train_path", "val_path"):
        if data.get(key) and not Path(data[key]).is_absolute() and (base / data[key]).exists():
            data[key] = str((base / data[key]).resolve())
    output = config.output_dir if Path(config.output_dir).is_absolute() else str((base / config.output_dir).resolve())
    model = config.model
    if model.adapter and not Path(model.adapter).is_absolute() and (base / model.adapter).exists():
        model = dataclasses.replace(model, adapter=str((base / model.adapter).resolve()))
    return dataclasses.replace(config, data=data, output_dir=output, model=model)


def dump(config: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def remote_code_warning(config: RunConfig) -> str | None:
    """The warning a run file that lets the model run its own code deserves; None for one that does not."""
    if not config.model.trust_remote_code:
        return None
    return (f"model.trust_remote_code is true: Python code that comes with {config.model.source} will run on this "
            "machine with your permissions; keep it only for a model source you trust")


def save(config: RunConfig, path: str | Path) -> None:
    write_atomic(path, dump(config))


# The built-in demo (dates to ISO 8601 on the default model): a run that shows a curve within minutes on a CPU.
DEMO_TRAINING = TrainingConfig(max_steps=60, batch_size=8, eval_every=20, eval_examples=16, save_every=20,
                               spectrum_every=5, learning_rate=2e-3)
DEMO_PLAN: dict[str, Any] = {"targets": "all-linear", "rank": 8, "alpha": 16.0, "dropout": 0.05, "variant": "lora"}
EXAMPLE_HEADER = "A LoRA Studio run: `lora-studio train run.yaml`. Paths are relative to this file."
COMMENT_WIDTH = 116


def field_help(cls: type, name: str) -> str:
    """A run-file field's help (its metadata["help"]); "" for a field that carries none."""
    return str(cls.__dataclass_fields__[name].metadata.get("help", ""))


def example(data: Mapping[str, Any], *, data_fields: type | None = None, plan_fields: type | None = None) -> str:
    """The commented run file `init-run` writes: every field under its help, at the demo's value or its default.

    Model and training fields come from ModelConfig and DEMO_TRAINING, the plan from DEMO_PLAN, the data from
    `data`. `plan_fields` and `data_fields` (LoraPlan, DataSpec: they live above this module) add their other
    fields at their defaults, and their help where they carry it; a field without help is written bare. The
    result is valid YAML that `lora-studio train` runs."""
    sections = [
        ("model", _values(ModelConfig, {}), ModelConfig),
        ("plan", _values(plan_fields, DEMO_PLAN), plan_fields),
        ("data", _values(data_fields, data), data_fields),
        ("training", dataclasses.asdict(DEMO_TRAINING), TrainingConfig),
    ]
    lines = _comment(EXAMPLE_HEADER, "")
    for name, values, cls in sections:
        lines += ["", *_comment(field_help(RunConfig, name), ""), f"{name}:"]
        for key, value in values.items():
            lines += _comment(field_help(cls, key) if cls else "", "  ") + _yaml_lines(key, value, "  ")
    for name in ("output_dir", "run_name"):
        lines += ["", *_comment(field_help(RunConfig, name), ""), *_yaml_lines(name, getattr(RunConfig(), name), "")]
    return "\n".join(lines) + "\n"


def _values(cls: type | None, chosen: Mapping[str, Any]) -> dict[str, Any]:
    """`chosen` over the defaults of `cls`'s fields, in field order (fields without a default and not chosen are
    left out); just `chosen` without a class."""
    if cls is None:
        return dict(chosen)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in chosen:
            values[f.name] = chosen[f.name]
        elif f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    return values


def _comment(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, COMMENT_WIDTH - len(indent), initial_indent=f"{indent}# ",
                         subsequent_indent=f"{indent}# ") if text else []


def _yaml_lines(key: str, value: Any, indent: str) -> list[str]:
    import yaml

    if isinstance(value, tuple):
        value = list(value)
    elif isinstance(value, Mapping):
        value = dict(value)
    text = yaml.safe_dump({key: value}, default_flow_style=False, sort_keys=False, width=COMMENT_WIDTH)
    return [indent + line for line in text.splitlines()]
