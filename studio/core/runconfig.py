"""The run file: everything a training run needs (model, plan, data, hyperparameters), as the GUI saves it and
`lora-studio train run.yaml` runs it. Loaded with clear one-line errors naming the field that is wrong."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from studio.core.errors import RunConfigError
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
    max_steps: int | None = 100  # optimizer steps; None when the run is given in epochs
    epochs: float | None = field(default=None, metadata={"help": (
        "Passes over the training data, instead of max_steps (give one of them); the steps they mean follow from "
        "the prepared data, the batch size, gradient accumulation and the number of processes")})
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
    eval_every: int | None = 25  # steps; 0 turns evaluation off until the end
    eval_every_epochs: float | None = field(default=None, metadata={"help": (
        "Evaluate every this many epochs (e.g. 0.5), instead of eval_every steps")})
    eval_examples: int = 64  # validation examples scored by generation (exact match) per evaluation
    save_every: int | None = 50  # steps between checkpoints; 0 keeps only the final adapter
    save_every_epochs: float | None = field(default=None, metadata={"help": (
        "Save a checkpoint every this many epochs, instead of save_every steps")})
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
        _reject_unknown("run file", data, {f.name for f in dataclasses.fields(cls)})
        model = _section(ModelConfig, data.get("model") or {}, "model")
        training = _section(TrainingConfig, _in_steps_or_epochs(data.get("training") or {}), "training")
        plan = dict(data.get("plan") or {})
        if not plan.get("targets") and not model.adapter:
            raise RunConfigError("plan.targets is missing: name a preset (all-linear, attention, ...) or modules")
        if not (data.get("data") or {}).get("train_path"):
            raise RunConfigError("data.train_path is missing: the training file to read")
        config = cls(
            model=model,
            plan=plan,
            data=dict(data["data"]),
            training=training,
            output_dir=str(data.get("output_dir") or "runs"),
            run_name=data.get("run_name"),
        )
        config.check()
        return config

    def check(self) -> None:
        t = self.training
        _require(t.learning_rate > 0, "training.learning_rate must be positive")
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
        _require(t.schedule in ("cosine", "linear", "constant"), "training.schedule: use cosine, linear or constant")
        _require(t.optimizer in ("adamw", "adamw-8bit"), "training.optimizer: use adamw or adamw-8bit")
        _require(t.precision in ("auto", "no", "bf16", "fp16"), "training.precision: use auto, no, bf16 or fp16")
        _require(t.max_grad_norm >= 0, "training.max_grad_norm must be >= 0 (0 turns clipping off)")
        for name in ("eval_every", "save_every", "spectrum_every", "eval_examples", "eval_every_epochs",
                     "save_every_epochs"):
            _require(getattr(t, name) is None or getattr(t, name) >= 0, f"training.{name} must be >= 0")
        for name in ("fused_loss", "compile_layers"):
            value = getattr(t, name)
            _require(isinstance(value, bool) or value == "auto",
                     f"training.{name}: use true, false or auto, got {value!r}")
        _require(self.model.task in ("causal-lm", "seq-cls"), "model.task: use causal-lm or seq-cls")


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


def _reject_unknown(where: str, data: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise RunConfigError(f"unknown field(s) in {where}: {', '.join(unknown)} (known: {', '.join(sorted(known))})")


def _section(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise RunConfigError(f"`{where}` must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(where, data, set(fields))
    values = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise RunConfigError(f"{where}.{name} must be true or false, got {value!r}")
        number = type(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else (
            float if default is None and "float" in str(fields[name].type) else None)
        if number is not None and value is not None:
            try:
                value = number(value)
            except (TypeError, ValueError):
                raise RunConfigError(f"{where}.{name} must be a number, got {value!r}") from None
        values[name] = value
    return cls(**values)


def load(path: str | Path) -> RunConfig:
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RunConfigError(f"cannot read the run file {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RunConfigError(f"{path} is not valid YAML{where}") from exc
    config = RunConfig.from_dict(data or {})
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
  overflow: auto             # longer rows: text -> windows; instruction, chat -> drop (or truncate_left)
training:
  learning_rate: 0.002
  max_steps: 60              # optimizer steps; or `epochs: 3` (passes over the data) instead
  batch_size: 8
  eval_every: 20
  save_every: 20
  spectrum_every: 10
output_dir: runs
"""
