"""The run file: everything a training run needs (model, plan, data, hyperparameters), as the GUI saves it and
`lora-studio train run.yaml` runs it. Loaded with clear one-line errors naming the field that is wrong."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from studio.core.errors import RunConfigError, did_you_mean
from studio.core.files import write_atomic


@dataclass(frozen=True)
class ModelConfig:
    source: str = "default"
    task: str = "causal-lm"
    num_labels: int = 2
    dtype: str | None = None  # float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: the first CUDA GPU when there is one
    quantization: str | None = None  # 4bit / 8bit (QLoRA), CUDA only
    trust_remote_code: bool = False
    adapter: str | None = None  # an existing PEFT adapter to continue training (its targets and ranks win)


@dataclass(frozen=True)
class TrainingConfig:
    learning_rate: float = 2e-4
    max_steps: int = 100  # optimizer steps; epochs are derived from it
    batch_size: int = 8
    gradient_accumulation: int = 1
    warmup_ratio: float = 0.05
    schedule: str = "cosine"  # cosine / linear / constant
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"  # adamw / adamw-8bit (CUDA)
    precision: str = "auto"  # auto / no / bf16 / fp16
    gradient_checkpointing: bool = False
    seed: int = 0
    eval_every: int = 25  # steps; 0 turns evaluation off until the end
    eval_examples: int = 64  # validation examples scored by generation (exact match) per evaluation
    save_every: int = 50  # steps between checkpoints; 0 keeps only the final adapter
    spectrum_every: int = 10  # steps between spectrum snapshots; 0 turns them off
    keep_checkpoints: int = 2  # older checkpoints are removed, the newest kept
    # the fast path (same math): true / false / auto
    fused_loss: bool | str = "auto"  # chunked cross-entropy without the full logits; auto: on a CUDA GPU
    compile_layers: bool | str = "auto"  # torch.compile each decoder layer (CUDA); auto: once a run is long enough


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    plan: dict[str, Any] = field(default_factory=dict)  # LoraPlan fields; `targets` may be a preset or spec
    data: dict[str, Any] = field(default_factory=dict)  # DataSpec fields
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output_dir: str = "runs"
    run_name: str | None = None  # default: a timestamp and the model's name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        if not isinstance(data, Mapping):
            raise RunConfigError("a run file must be a mapping with model, plan, data and training sections")
        _reject_unknown("the run file", data, {f.name for f in dataclasses.fields(cls)})
        model = _section(ModelConfig, data.get("model") or {}, "model")
        training = _section(TrainingConfig, data.get("training") or {}, "training")
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
        _require(t.max_steps >= 1, "training.max_steps must be at least 1")
        _require(t.batch_size >= 1, "training.batch_size must be at least 1")
        _require(t.gradient_accumulation >= 1, "training.gradient_accumulation must be at least 1")
        _require(0 <= t.warmup_ratio < 1, "training.warmup_ratio must be in [0, 1)")
        _require(t.weight_decay >= 0, "training.weight_decay must be >= 0")
        _one_of("training.schedule", t.schedule, ("cosine", "linear", "constant"))
        _one_of("training.optimizer", t.optimizer, ("adamw", "adamw-8bit"))
        _one_of("training.precision", t.precision, ("auto", "no", "bf16", "fp16"))
        _require(t.max_grad_norm >= 0, "training.max_grad_norm must be >= 0 (0 turns clipping off)")
        for name in ("eval_every", "save_every", "spectrum_every", "eval_examples", "keep_checkpoints"):
            _require(getattr(t, name) >= 0, f"training.{name} must be >= 0")
        for name in ("fused_loss", "compile_layers"):
            value = getattr(t, name)
            _require(isinstance(value, bool) or value == "auto",
                     f"training.{name}: use true, false or auto, got {value!r}")
        m = self.model
        _one_of("model.task", m.task, ("causal-lm", "seq-cls"))
        _require(m.task != "seq-cls" or m.num_labels >= 2, "model.num_labels must be at least 2 for seq-cls")
        if m.dtype is not None:
            _one_of("model.dtype", m.dtype, ("float32", "bfloat16", "float16"))
        if m.quantization is not None:
            _one_of("model.quantization", m.quantization, ("4bit", "8bit"))
        _require(m.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", m.device) is not None,
                 f"model.device: use auto, cpu, cuda or cuda:N, got {m.device!r}")


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
    """`value` as the type of the field's default; RunConfigError naming the field when it cannot be one."""
    if "bool | str" in str(annotation):  # true, false or auto: checked by RunConfig.check
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RunConfigError(f"{where} must be true or false, got {_shown(value)}")
        return value
    if isinstance(default, (int, float)):
        number = _number(where, value)
        if isinstance(default, float):
            return number
        if not float(number).is_integer():
            raise RunConfigError(f"{where} must be a whole number, got {_shown(value)}")
        return int(number)
    if value is None and "None" in str(annotation):
        return None
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


def save(config: RunConfig, path: str | Path) -> None:
    write_atomic(path, dump(config))


EXAMPLE = """\
# A LoRA Studio run: `lora-studio train run.yaml`. Paths are relative to this file.
model:
  source: default            # default (SmolLM2-135M-Instruct), a folder, a .gguf, or a hub id
  task: causal-lm            # causal-lm or seq-cls (then set num_labels)
  device: auto               # auto picks the first CUDA GPU, else the CPU
  quantization: null         # 4bit for QLoRA (CUDA + bitsandbytes)
  adapter: null              # a PEFT adapter folder to keep training (then its targets and ranks are used)
plan:
  targets: all-linear        # a preset (attention, mlp, all-linear, peft-default) or q_proj,v_proj ...
  rank: 8
  alpha: 16
  dropout: 0.05
  variant: lora              # lora, rslora or dora
data:
  train_path: {train}
  val_path: {val}
  format: instruction        # auto, text, instruction, chat or classification
  max_length: 128
training:
  learning_rate: 0.002
  max_steps: 60
  batch_size: 8
  eval_every: 20
  save_every: 20
  spectrum_every: 10
output_dir: runs
"""
