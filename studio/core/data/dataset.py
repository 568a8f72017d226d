"""Datasets in, tokenized training examples out.

`prepare(spec, tokenizer)` reads the train (and validation) file, detects or applies the format (see formats.py),
tokenizes, reports every unusable row as a `BadRow`, splits off validation, computes token-length statistics and
optionally packs. `collate(examples, pad_token_id)` pads a batch for the model. Files are read by tables.py; rows
that cannot be read or formatted become `BadRow`s (with tables.py's 1-based row numbers): reported and skipped, or,
with on_bad_rows="stop", the reason preparation stops.

Packing concatenates consecutive examples (never splitting one) into sequences of at most max_length tokens.
Each packed example carries `position_ids` that restart at 0 for every original example and `collate` then leaves
`attention_mask` out: transformers (>= 5) reads restarting position ids without a mask as packed sequences and builds
a block-diagonal causal mask, so an example never attends to its neighbours, provided the forward pass runs with
`use_cache=False` (with a KV cache transformers skips that detection; training needs no cache anyway). The first
label of every packed example is -100 so that no token is trained to predict the start of the next, unrelated one.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Mapping, Sequence

from studio.core.data.formats import (
    FORMATS,
    REQUIRED_ROLES,
    Format,
    Rendered,
    RowFormatter,
    RowProblem,
    detect_format,
    resolve_columns,
)
from studio.core.data.tables import Record, Table, TxtMode, read_table
from studio.core.errors import DataError, did_you_mean
from studio.core.resources import resources_root

FormatChoice = Literal["auto", "text", "instruction", "chat", "classification"]
BadRowPolicy = Literal["skip", "stop"]
IGNORE_INDEX = -100  # the label value torch's cross-entropy (and transformers' loss) skips
DEMO_DIR = resources_root() / "demo"  # the source tree's resources/ or a wheel's share/lora-studio


@dataclass(frozen=True)
class DataSpec:
    """What to train on and how to cut it. `columns` maps roles (text, prompt, input, response, messages, label)
    to column names; roles left out are detected."""

    train_path: str
    format: FormatChoice = "auto"
    columns: Mapping[str, str] = field(default_factory=dict)
    val_path: str | None = None
    val_fraction: float = 0.0
    seed: int = 0
    max_length: int = 512
    packing: bool = False
    on_bad_rows: BadRowPolicy = "skip"
    txt_mode: TxtMode = "file"
    label_names: tuple[str, ...] = ()

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
        except (TypeError, ValueError) as exc:
            raise DataError(f"val_fraction and seed must be numbers: {exc}") from exc
        return cls(**values)


@dataclass(frozen=True)
class BadRow:
    """A row left out (or that stopped preparation): the file, its 1-based row number, and why."""

    file: str
    row: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}, row {self.row}: {self.reason}"


@dataclass(frozen=True)
class Example:
    """A tokenized training example. `labels` holds -100 where a token carries no loss (empty for
    classification, whose target is `class_id`). `full_length` counts the tokens before truncation."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    full_length: int
    class_id: int | None = None
    position_ids: tuple[int, ...] | None = None  # only on packed examples

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)


@dataclass(frozen=True)
class LengthStats:
    """Token lengths before truncation; `truncated` counts those over `max_length`."""

    count: int
    min: int
    mean: float
    median: float
    p95: float
    max: int
    truncated: int
    max_length: int
    lengths: tuple[int, ...]

    @classmethod
    def of(cls, lengths: Sequence[int], max_length: int) -> LengthStats:
        import numpy as np

        if not lengths:
            return cls(0, 0, 0.0, 0.0, 0.0, 0, 0, max_length, ())
        values = np.asarray(lengths)
        return cls(
            count=len(lengths), min=int(values.min()), mean=float(values.mean()), median=float(np.median(values)),
            p95=float(np.percentile(values, 95)), max=int(values.max()),
            truncated=int((values > max_length).sum()), max_length=max_length, lengths=tuple(int(v) for v in lengths),
        )


@dataclass(frozen=True)
class PreparedData:
    train: tuple[Example, ...]  # packed when the spec asks for packing
    val: tuple[Example, ...]  # never packed, so that each can be scored on its own
    format: Format
    columns: Mapping[str, str]
    label_names: tuple[str, ...]  # classification only: class id -> name
    bad_rows: tuple[BadRow, ...]
    stats: LengthStats  # training examples, before packing
    val_stats: LengthStats


@dataclass(frozen=True)
class Preview:
    """One row as the model will see it: the rendered text and (token text, carries loss) for the tokens that
    train (after truncation). `problem` is set, and `tokens` empty, when the row is a bad row."""

    file: str
    row: int
    format: Format
    text: str
    tokens: tuple[tuple[str, bool], ...]
    length: int
    truncated: bool
    label: str | None = None
    problem: str | None = None


def demo_spec() -> DataSpec:
    """The built-in demo: dates to ISO 8601, for the built-in model (see resources/demo/README.md)."""
    return DataSpec(
        train_path=str(DEMO_DIR / "train.jsonl"), format="instruction", val_path=str(DEMO_DIR / "heldout.jsonl"),
        max_length=128,
    )


# -- preparing ---------------------------------------------------------------------------------------------------------
def prepare(spec: DataSpec, tokenizer: Any) -> PreparedData:
    """Read, validate, format, tokenize, split and pack. Raises DataError for unreadable files, missing columns,
    bad rows under on_bad_rows='stop', or when no row is usable."""
    tables = [read_table(spec.train_path, spec.txt_mode)]
    if spec.val_path:
        tables.append(read_table(spec.val_path, spec.txt_mode))
    fmt: Format = detect_format(tables[0].columns, spec.columns) if spec.format == "auto" else spec.format
    if spec.packing and fmt == "classification":
        raise DataError("packing joins texts for language modelling; turn it off for classification")
    columns = _columns(tables[0], fmt, spec.columns)
    for table in tables[1:]:  # the validation file needs the required columns; optional ones may be absent
        _columns(table, fmt, {role: columns[role] for role in REQUIRED_ROLES[fmt]})
    formatter = RowFormatter(tokenizer, fmt, columns)

    rendered: list[list[tuple[Record, Rendered]]] = []
    bad: list[list[BadRow]] = []
    for table in tables:
        good, problems = _render(formatter, table.records)
        rendered.append(good)
        bad.append(problems)
    label_names = class_names(spec.label_names, [r.label for part in rendered for _, r in part]) if (
        fmt == "classification") else ()
    parts: list[list[Example]] = []
    for part, problems in zip(rendered, bad):
        examples = []
        for record, item in part:
            try:
                examples.append(_example(formatter, item, spec.max_length, label_names))
            except RowProblem as exc:
                problems.append(BadRow(record.file, record.row, str(exc)))
        parts.append(examples)
    bad_rows = tuple(b for problems in bad for b in sorted(problems, key=lambda b: (b.file, b.row)))
    if bad_rows and spec.on_bad_rows == "stop":
        raise DataError(f"{bad_rows[0]} ({len(bad_rows)} bad row(s) in all: fix them, or choose to skip bad rows)")
    train, val = parts[0], parts[1] if len(parts) > 1 else []
    if not train:
        raise DataError(f"{tables[0].path} has no usable rows ({len(bad[0])} bad): see the bad rows")
    if spec.val_fraction:
        train, val = _split(train, spec.val_fraction, spec.seed)
    stats = LengthStats.of([e.full_length for e in train], spec.max_length)
    val_stats = LengthStats.of([e.full_length for e in val], spec.max_length)
    if spec.packing:
        train = pack(train, spec.max_length)
    return PreparedData(tuple(train), tuple(val), fmt, columns, label_names, bad_rows, stats, val_stats)


def _columns(table: Table, fmt: Format, mapping: Mapping[str, str]) -> dict[str, str]:
    try:
        return resolve_columns(fmt, table.columns, mapping)
    except DataError as exc:
        raise DataError(f"{table.path}: {exc}") from exc


def _render(formatter: RowFormatter, records: Sequence[Record]) -> tuple[list[tuple[Record, Rendered]], list[BadRow]]:
    good, bad = [], []
    for record in records:
        try:
            if record.values is None:
                raise RowProblem(record.problem or "unreadable")
            good.append((record, formatter.render(record.values)))
        except RowProblem as exc:
            bad.append(BadRow(record.file, record.row, str(exc)))
    return good, bad


def class_names(given: tuple[str, ...], labels: Sequence[str | int]) -> tuple[str, ...]:
    """Class names in id order: the given ones; else 0..max for integer labels; else the names sorted. `labels` are
    valid labels (names, or integers of 0 or more) as the formatter reads them."""
    if given:
        return given
    if labels and all(isinstance(v, int) or v.isdigit() for v in labels):
        return tuple(str(i) for i in range(max(int(v) for v in labels) + 1))
    return tuple(sorted({str(v) for v in labels}))


def _class_id(label: str | int, names: tuple[str, ...]) -> int:
    if isinstance(label, int) or (label.isdigit() and label not in names):
        if int(label) < len(names):
            return int(label)
        raise RowProblem(f"label {label} is out of range: there are {len(names)} classes")
    if label not in names:
        raise RowProblem(f"label {label!r} is not one of {', '.join(names)}")
    return names.index(label)


def _example(formatter: RowFormatter, rendered: Rendered, max_length: int, label_names: tuple[str, ...]) -> Example:
    tokens, full_length = formatter.tokenize(rendered, max_length)
    if formatter.fmt == "classification":
        return Example(tokens.ids, (), full_length, class_id=_class_id(rendered.label, label_names))
    labels = tuple(t if loss else IGNORE_INDEX for t, loss in zip(tokens.ids, tokens.loss))
    return Example(tokens.ids, labels, full_length)


def _split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out round(n·fraction) examples (at least one), chosen by `seed`; both parts keep file order."""
    n_val = max(1, round(len(examples) * fraction))
    if n_val >= len(examples):
        raise DataError(f"holding out {fraction:.0%} of {len(examples)} rows leaves none to train on")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def pack(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Join consecutive examples into sequences of at most `max_length` tokens (see the module docstring)."""
    packs: list[Example] = []
    group: list[Example] = []

    def close() -> None:
        packs.append(Example(
            input_ids=tuple(t for e in group for t in e.input_ids),
            labels=tuple(label for e in group for label in (IGNORE_INDEX, *e.labels[1:])),
            full_length=sum(e.full_length for e in group),
            position_ids=tuple(p for e in group for p in range(len(e.input_ids))),
        ))

    for example in examples:
        if group and sum(len(e.input_ids) for e in group) + len(example.input_ids) > max_length:
            close()
            group = []
        group.append(example)
    if group:
        close()
    return packs


def preview(spec: DataSpec, tokenizer: Any, index: int, table: Table | None = None) -> Preview:
    """Row `index` (0-based, counting bad rows too) of the training file as it will train. Pass a `table` from
    `read_table` to avoid re-reading the file on every call."""
    table = table or read_table(spec.train_path, spec.txt_mode)
    if not 0 <= index < len(table.records):
        raise DataError(f"row index {index} is out of range: the file has {len(table.records)} rows")
    record = table.records[index]
    fmt: Format = detect_format(table.columns, spec.columns) if spec.format == "auto" else spec.format
    formatter = RowFormatter(tokenizer, fmt, _columns(table, fmt, spec.columns))
    text = ""
    try:
        if record.values is None:
            raise RowProblem(record.problem or "unreadable")
        rendered = formatter.render(record.values)
        text = rendered.text
        tokens, length = formatter.tokenize(rendered, spec.max_length)
    except RowProblem as exc:
        return Preview(record.file, record.row, fmt, text, (), 0, False, problem=str(exc))
    label = None if rendered.label is None else str(rendered.label)
    pairs = tuple(zip(tokens.pieces, tokens.loss))
    return Preview(record.file, record.row, fmt, text, pairs, length, length > len(tokens.ids), label)


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask, labels (-100 on padding and non-loss tokens; class ids for
    classification). Packed examples give position_ids instead of attention_mask: call the model with
    use_cache=False so that each packed example attends only to itself (see the module docstring); the padding then
    forms a block of its own."""
    import torch

    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, example in enumerate(examples):
        input_ids[i, : len(example.input_ids)] = torch.tensor(example.input_ids)
        attention_mask[i, : len(example.input_ids)] = 1
    if examples[0].class_id is not None:
        labels = torch.tensor([e.class_id for e in examples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, example in enumerate(examples):
        labels[i, : len(example.labels)] = torch.tensor(example.labels)
    if examples[0].position_ids is None:
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    position_ids = torch.zeros((len(examples), width), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        position_ids[i] = torch.cat([torch.tensor(example.position_ids), torch.arange(width - n)])
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
