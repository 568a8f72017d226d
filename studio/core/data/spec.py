"""What to train on and how to cut it: `DataSpec`, the run file's `data` section. Each field's `help` is the text
the window's tooltips and the CLI show."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Mapping

from studio.core.data.formats import FORMATS, Format
from studio.core.data.tables import TxtMode
from studio.core.errors import DataError, did_you_mean

FormatChoice = Literal["auto", "text", "instruction", "chat", "classification"]
BadRowPolicy = Literal["skip", "stop"]
Overflow = Literal["auto", "window", "truncate", "truncate_left", "drop"]
# What each format may do with a row longer than max_length; the first is what `auto` means.
OVERFLOWS: dict[Format, tuple[Overflow, ...]] = {
    "text": ("window", "truncate", "drop"),
    "instruction": ("drop", "truncate_left"),
    "chat": ("drop", "truncate_left"),
    "classification": ("truncate", "drop"),
}


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class DataSpec:
    """What to train on and how to cut it. `columns` maps roles (text, prompt, input, response, messages, label)
    to column names; roles left out are detected."""

    train_path: str = field(metadata=_help(
        "The training data: a CSV, TSV, JSON, JSONL, Parquet or TXT file, a folder of .txt files, or a hub dataset "
        "id (owner/name, owner/name:config@split)"))
    format: FormatChoice = field(default="auto", metadata=_help(
        "auto (detected from the columns), text (every token trains), instruction (prompt to response), chat "
        "(messages) or classification (text to label)"))
    columns: Mapping[str, str] = field(default_factory=dict, metadata=_help(
        "Roles mapped to column names where detection does not find them, e.g. {response: answer}"))
    val_path: str | None = field(default=None, metadata=_help(
        "A validation file or hub dataset id, read with the training data's columns"))
    val_fraction: float = field(default=0.0, metadata=_help(
        "Share of the training rows held out for validation (0: none), chosen by the seed"))
    seed: int = field(default=0, metadata=_help("Chooses the rows the validation fraction holds out"))
    max_length: int = field(default=512, metadata=_help(
        "Tokens per training example; `overflow` says what happens to longer rows"))
    overflow: Overflow = field(default="auto", metadata=_help(
        "Rows longer than max_length: window (text: consecutive windows, each an example), truncate (keep the first "
        "max_length tokens; text, classification), truncate_left (cut the prompt from the left so the response "
        "survives; instruction, chat), drop (leave the row out and list it with the bad rows); auto: window for "
        "text, drop for instruction and chat, truncate for classification"))
    stride: int = field(default=0, metadata=_help(
        "Windows only: tokens each window repeats from the one before, as context without loss (0: none)"))
    packing: bool = field(default=False, metadata=_help(
        "Join short examples into sequences of max_length tokens (each still attends only to itself): less "
        "padding, faster epochs"))
    on_bad_rows: BadRowPolicy = field(default="skip", metadata=_help(
        "skip: leave rows that cannot be read or formatted out and list them; stop: fail at the first one"))
    txt_mode: TxtMode = field(default="file", metadata=_help(
        "TXT files: one document per file, or one per blank-line-separated block"))
    label_names: tuple[str, ...] = field(default=(), metadata=_help(
        "Classification: the class names in id order (default: the labels found, sorted)"))

    def __post_init__(self) -> None:
        if not str(self.train_path).strip():
            raise DataError("no training data given: choose a file")
        if self.format not in ("auto", *FORMATS):
            raise DataError(f"unknown data format {self.format!r}{did_you_mean(self.format, FORMATS)} (use auto, "
                            f"{', '.join(FORMATS)})")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise DataError(f"max_length must be an integer of at least 2, not {self.max_length!r}")
        if not isinstance(self.val_fraction, (int, float)) or not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"val_fraction must be at least 0 and below 1, not {self.val_fraction!r}")
        if self.val_path and self.val_fraction:
            raise DataError("give either a validation file or a validation fraction, not both")
        if self.on_bad_rows not in ("skip", "stop"):
            raise DataError(f"on_bad_rows must be skip or stop, not {self.on_bad_rows!r}")
        if self.txt_mode not in ("file", "blocks"):
            raise DataError(f"txt_mode must be file or blocks, not {self.txt_mode!r}")
        if self.packing and self.format == "classification":
            raise DataError("packing joins texts for language modelling; turn it off for classification")
        if self.overflow not in ("auto", "window", "truncate", "truncate_left", "drop"):
            raise DataError(f"overflow must be auto, window, truncate, truncate_left or drop, not {self.overflow!r}")
        if not isinstance(self.stride, int) or not 0 <= self.stride < self.max_length:
            raise DataError(f"stride must be an integer from 0 to max_length - 1, not {self.stride!r}")
        if self.stride and self.overflow not in ("auto", "window"):
            raise DataError("stride is the overlap of windows: it needs overflow window (or auto, for text)")
        if self.format != "auto":
            overflow_for(self.format, self.overflow)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["columns"] = dict(self.columns)
        data["label_names"] = list(self.label_names)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(key) for key in set(data) - known)
        if unknown:
            hint = did_you_mean(unknown[0], known) or f" (known: {', '.join(sorted(known))})"
            raise DataError(f"unknown data setting `{unknown[0]}`{hint}")
        if "train_path" not in data:
            raise DataError("the data settings need a train_path")
        values = dict(data)
        for key in ("train_path", "val_path"):
            if values.get(key) is not None and not isinstance(values[key], str):
                raise DataError(f"data.{key} must be a file or folder path, got {values[key]!r}")
        if not isinstance(values.get("columns") or {}, Mapping):
            raise DataError("data columns must map roles to column names, e.g. {response: answer}")
        values["columns"] = {str(k): str(v) for k, v in (values.get("columns") or {}).items()}
        names = values.get("label_names") or ()
        if isinstance(names, str) or not isinstance(names, (list, tuple)):
            raise DataError(f"data.label_names must be a list of class names, got {names!r}")
        values["label_names"] = tuple(str(n) for n in names)
        if not isinstance(values.get("packing", False), bool):
            raise DataError(f"data.packing must be true or false, got {values['packing']!r}")
        try:
            values["val_fraction"] = float(values.get("val_fraction") or 0.0)
            values["seed"] = int(values.get("seed", 0))
            values["stride"] = int(values.get("stride") or 0)
        except (TypeError, ValueError) as exc:
            raise DataError(f"val_fraction, seed and stride must be numbers: {exc}") from exc
        return cls(**values)


def overflow_for(fmt: Format, overflow: Overflow) -> Overflow:
    """The policy `overflow` means for `fmt` (auto resolved). Raises DataError when the format cannot do it."""
    allowed = OVERFLOWS[fmt]
    if overflow == "auto":
        return allowed[0]
    if overflow not in allowed:
        raise DataError(f"overflow {overflow} does not apply to the {fmt} format: use {' or '.join(allowed)}")
    return overflow
