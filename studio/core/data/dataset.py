"""Datasets in, tokenized training examples out, as a forward pipeline; each stage works on a whole file's rows:

read (tables.py: files and hub datasets into rows) -> resolve columns and render (formats.py: text with loss spans)
-> tokenize (encoding.py, batched) -> fit to max_length, split, pack (examples.py, on numpy arrays) -> cache
(cache.py: the next `prepare` of the same files, tokenizer and settings reads the result back).

Every row that cannot be read or formatted becomes a `BadRow` (with tables.py's 1-based row numbers): reported and
skipped, or, with on_bad_rows="stop", the reason preparation stops. Rows longer than max_length follow the spec's
`overflow` policy (spec.py): text splits into windows (or is cut, or dropped), instruction and chat rows are dropped
(listed with the bad rows) or lose the start of their prompt, classification rows are cut by the tokenizer. A
validation fraction holds out whole rows, before any is split into windows.

Packing joins examples (never splitting one) into sequences of at most max_length tokens (examples.pack: best fit).
Each packed example carries `position_ids` that restart at 0 for every original example and `collate` then leaves
`attention_mask` out: transformers (>= 5) reads restarting position ids without a mask as packed sequences and builds
a block-diagonal causal mask, so an example never attends to its neighbours, provided the forward pass runs with
`use_cache=False` (with a KV cache transformers skips that detection; training needs no cache anyway). The first
label of every packed example is -100 so that no token is trained to predict the start of the next, unrelated one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from studio.core.data import cache as store
from studio.core.data.encoding import ENCODE_BATCH, encode, encode_batches, pieces
from studio.core.data.examples import IGNORE_INDEX, Example, ExampleTable, pack, window_counts
from studio.core.data.formats import (
    REQUIRED_ROLES,
    Format,
    Rendered,
    Renderer,
    RowProblem,
    detect_format,
    resolve_columns,
)
from studio.core.data.overflow import fit
from studio.core.data.spec import DataSpec, Overflow, overflow_for
from studio.core.data.tables import Table, read_table, source_fingerprint
from studio.core.errors import DataError
from studio.core.resources import resources_root

DEMO_DIR = resources_root() / "demo"  # the source tree's resources/ or a wheel's share/lora-studio
PREVIEW_TOKENS = 4096  # a preview shows at most this many tokens (a whole book would freeze the text view)


@dataclass(frozen=True)
class BadRow:
    """A row left out (or that stopped preparation): the file, its 1-based row number, and why."""

    file: str
    row: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}, row {self.row}: {self.reason}"


@dataclass(frozen=True, eq=False)
class LengthStats:
    """Token lengths of the rows before they were cut or split; `truncated` counts those over `max_length`."""

    count: int
    min: int
    mean: float
    median: float
    p95: float
    max: int
    truncated: int
    max_length: int
    lengths: np.ndarray

    @classmethod
    def of(cls, lengths: Sequence[int] | np.ndarray, max_length: int) -> LengthStats:
        values = np.asarray(lengths, dtype=np.int64)
        if not len(values):
            return cls(0, 0, 0.0, 0.0, 0.0, 0, 0, max_length, values)
        return cls(
            count=len(values), min=int(values.min()), mean=float(values.mean()), median=float(np.median(values)),
            p95=float(np.percentile(values, 95)), max=int(values.max()),
            truncated=int((values > max_length).sum()), max_length=max_length, lengths=values,
        )


@dataclass(frozen=True, eq=False)
class PreparedData:
    train: ExampleTable  # packed when the spec asks for packing
    val: ExampleTable  # never packed, so that each can be scored on its own
    format: Format
    columns: Mapping[str, str]
    label_names: tuple[str, ...]  # classification only: class id -> name
    bad_rows: tuple[BadRow, ...]
    stats: LengthStats  # training rows, before they were cut or split
    val_stats: LengthStats
    overflow: Overflow  # what became of rows longer than max_length (auto resolved)
    examples: int  # training examples before packing: the rows, or their windows
    dropped: int  # rows left out for their length (they are among the bad rows)
    from_cache: bool = False


@dataclass(frozen=True)
class Preview:
    """One row as the model will see it: the rendered text and (token text, carries loss) for the tokens that
    train (the first PREVIEW_TOKENS of them). `length` counts the row's tokens, `kept` those that train after a
    cut, `windows` the examples a long text becomes. `problem` is set, and `tokens` empty, for a bad row."""

    file: str
    row: int
    format: Format
    text: str
    tokens: tuple[tuple[str, bool], ...]
    length: int
    truncated: bool
    label: str | None = None
    problem: str | None = None
    kept: int = 0
    windows: int = 1


@dataclass
class _Rows:
    """One file's usable rows in file order: where each came from (file, row), their rendering (kept only where
    a later stage reads it: classification labels and cuts) and tokens, and the file's bad rows so far."""

    where: list[tuple[str, int]]
    rendered: list[Rendered]
    bad: list[BadRow] = field(default_factory=list)
    table: ExampleTable | None = None

    @property
    def lengths(self) -> np.ndarray:
        assert self.table is not None
        return self.table.lengths

    def take(self, indices: Sequence[int]) -> _Rows:
        assert self.table is not None
        rendered = [self.rendered[i] for i in indices] if self.rendered else []
        return _Rows([self.where[i] for i in indices], rendered, [],
                     self.table.take(np.asarray(indices, dtype=np.int64)))


def demo_spec() -> DataSpec:
    """The built-in demo: dates to ISO 8601, for the built-in model (see resources/demo/README.md)."""
    return DataSpec(
        train_path=str(DEMO_DIR / "train.jsonl"), format="instruction", val_path=str(DEMO_DIR / "heldout.jsonl"),
        max_length=128,
    )


# -- preparing ---------------------------------------------------------------------------------------------------------
def prepare(spec: DataSpec, tokenizer: Any, *, use_cache: bool = True) -> PreparedData:
    """Read, validate, format, tokenize, fit, split and pack, or read all that back from the cache. Raises
    DataError for unreadable files, missing columns, bad rows under on_bad_rows='stop', or when no row is usable."""
    key = None
    if use_cache:
        key = store.cache_key({
            "spec": spec.to_dict(), "tokenizer": store.tokenizer_fingerprint(tokenizer),
            "train": source_fingerprint(spec.train_path, spec.txt_mode),
            "val": source_fingerprint(spec.val_path, spec.txt_mode) if spec.val_path else None,
        })
        entry = store.read(key)
        if entry is not None:
            return _from_cache(*entry)
    prepared = _prepare(spec, tokenizer)
    if key is not None:
        store.write(key, *_to_cache(prepared))
    return prepared


def _prepare(spec: DataSpec, tokenizer: Any) -> PreparedData:
    tables = [read_table(spec.train_path, spec.txt_mode)]
    if spec.val_path:
        tables.append(read_table(spec.val_path, spec.txt_mode))
    fmt: Format = detect_format(tables[0].columns, spec.columns) if spec.format == "auto" else spec.format
    if spec.packing and fmt == "classification":
        raise DataError("packing joins texts for language modelling; turn it off for classification")
    overflow = _overflow(spec, fmt)
    columns = _columns(tables[0], fmt, spec.columns)
    for table in tables[1:]:  # the validation file needs the required columns; optional ones may be absent
        _columns(table, fmt, {role: columns[role] for role in REQUIRED_ROLES[fmt]})
    renderer = Renderer(tokenizer, fmt, columns)

    parts = [_render_and_encode(renderer, table, tokenizer) for table in tables]
    train_path = tables[0].path
    del tables  # the raw rows: tokens and row numbers are all that is left to need
    if fmt == "classification":
        label_names = class_names(spec.label_names, [r.label for p in parts for r in p.rendered])
        parts = [_with_class_ids(part, label_names) for part in parts]
    else:
        label_names = ()
    problems = [b for part in parts for b in sorted(part.bad, key=_where)]
    if problems and spec.on_bad_rows == "stop":
        raise DataError(f"{problems[0]} ({len(problems)} bad row(s) in all: fix them, or choose to skip bad rows)")
    train, val = parts[0], parts[1] if len(parts) > 1 else None
    if not train.where:
        raise DataError(f"{train_path} has no usable rows ({len(train.bad)} bad): see the bad rows")
    if spec.val_fraction:
        train, val = _split(train, spec.val_fraction, spec.seed)
    stats = LengthStats.of(train.lengths, spec.max_length)
    val_stats = LengthStats.of(val.lengths if val else [], spec.max_length)
    train_table, train_dropped = _fit(train, overflow, spec, tokenizer)
    val_table, val_dropped = _fit(val, overflow, spec, tokenizer) if val else (ExampleTable.of([]), [])
    if not len(train_table):
        where = f"{train_path} (max_length={spec.max_length}, overflow: {overflow})"
        raise DataError(f"{where} has no usable rows ({len(train.bad) + len(train_dropped)} bad): see the bad rows")
    examples = len(train_table)
    if spec.packing:
        train_table = pack(train_table, spec.max_length, spec.seed)
    # the training file's bad rows (held-out ones too), then the validation file's, each in file order
    from_train = [*train.bad, *train_dropped, *(val_dropped if spec.val_fraction else [])]
    from_val = [*val.bad, *val_dropped] if val is not None and not spec.val_fraction else []
    bad_rows = tuple(sorted(from_train, key=_where) + sorted(from_val, key=_where))
    return PreparedData(train_table.compact(), val_table.compact(), fmt, columns, label_names, bad_rows, stats,
                        val_stats, overflow, examples, len(train_dropped) + len(val_dropped))


def _where(bad: BadRow) -> tuple[str, int]:
    return bad.file, bad.row


def _overflow(spec: DataSpec, fmt: Format) -> Overflow:
    overflow = overflow_for(fmt, spec.overflow)
    if spec.stride and overflow != "window":
        raise DataError(f"stride is the overlap of windows, and {fmt} rows are not split into windows: set it to 0")
    return overflow


def _columns(table: Table, fmt: Format, mapping: Mapping[str, str]) -> dict[str, str]:
    try:
        return resolve_columns(fmt, table.columns, mapping)
    except DataError as exc:
        raise DataError(f"{table.path}: {exc}") from exc


def _render_and_encode(renderer: Renderer, table: Table, tokenizer: Any) -> _Rows:
    """The table's usable rows rendered and tokenized (in batches, each tokenized while the next is rendered), and
    its bad rows. Only classification keeps the rendered text (its labels and cuts need it): a text once tokenized
    is not held twice."""
    rows = _Rows([], [])
    keep_text = renderer.fmt == "classification"

    def rendered_batches() -> Iterator[list[Rendered]]:
        for first in range(0, len(table.records), ENCODE_BATCH):
            records = table.records[first:first + ENCODE_BATCH]
            results = iter(renderer.render_rows([r.values for r in records if r.values is not None]))
            batch = []
            for record in records:
                result = next(results) if record.values is not None else RowProblem(record.problem or "unreadable")
                if isinstance(result, RowProblem):
                    rows.bad.append(BadRow(record.file, record.row, str(result)))
                else:
                    rows.where.append((record.file, record.row))
                    batch.append(result)
            if keep_text:
                rows.rendered.extend(batch)
            yield batch

    rows.table = encode_batches(tokenizer, rendered_batches(), with_loss=renderer.fmt != "classification")
    return rows


def _with_class_ids(rows: _Rows, label_names: tuple[str, ...]) -> _Rows:
    """Classification rows with their class ids; an unknown label makes a bad row."""
    ids: list[int] = []
    keep: list[int] = []
    for i, ((file, row), item) in enumerate(zip(rows.where, rows.rendered)):
        try:
            ids.append(_class_id(item.label, label_names))
            keep.append(i)
        except RowProblem as exc:
            rows.bad.append(BadRow(file, row, str(exc)))
    kept = rows.take(keep)
    kept.bad = rows.bad
    table = kept.table
    assert table is not None
    kept.table = ExampleTable(table.ids, table.loss, table.starts, class_ids=np.asarray(ids, dtype=np.int64))
    return kept


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


def _split(rows: _Rows, fraction: float, seed: int) -> tuple[_Rows, _Rows]:
    """Hold out round(n·fraction) rows (at least one), chosen by `seed`; both parts keep file order."""
    n = len(rows.where)
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise DataError(f"holding out {fraction:.0%} of {n} rows leaves none to train on")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    train = rows.take([i for i in range(n) if i not in held])
    train.bad = rows.bad
    return train, rows.take(sorted(held))


def _fit(rows: _Rows, overflow: Overflow, spec: DataSpec, tokenizer: Any) -> tuple[ExampleTable, list[BadRow]]:
    """The rows as examples of at most max_length tokens under `overflow`, and the rows that policy leaves out."""
    assert rows.table is not None
    table, left_out = fit(rows.table, overflow, spec.max_length, spec.stride, tokenizer, rows.rendered)
    return table, [BadRow(*rows.where[i], reason) for i, reason in left_out.items()]


# -- the cache's view of prepared data ---------------------------------------------------------------------------------
TABLE_ARRAYS = ("ids", "loss", "starts", "full_lengths", "class_ids", "piece_starts")


def _to_cache(prepared: PreparedData) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays = {"train_lengths": prepared.stats.lengths, "val_lengths": prepared.val_stats.lengths}
    for name, table in (("train", prepared.train), ("val", prepared.val)):
        for array in TABLE_ARRAYS:
            value = getattr(table, array)
            if value is not None:
                arrays[f"{name}_{array}"] = value
    header = {
        "format": prepared.format, "columns": dict(prepared.columns), "label_names": list(prepared.label_names),
        "bad_rows": [[b.file, b.row, b.reason] for b in prepared.bad_rows], "max_length": prepared.stats.max_length,
        "overflow": prepared.overflow, "examples": prepared.examples, "dropped": prepared.dropped,
    }
    return arrays, header


def _from_cache(arrays: dict[str, np.ndarray], header: dict[str, Any]) -> PreparedData:
    tables = {name: ExampleTable(*(arrays.get(f"{name}_{a}") for a in TABLE_ARRAYS)) for name in ("train", "val")}
    return PreparedData(
        tables["train"], tables["val"], header["format"], header["columns"], tuple(header["label_names"]),
        tuple(BadRow(*b) for b in header["bad_rows"]), LengthStats.of(arrays["train_lengths"], header["max_length"]),
        LengthStats.of(arrays["val_lengths"], header["max_length"]), header["overflow"], header["examples"],
        header["dropped"], from_cache=True,
    )


# -- one row, for the window -------------------------------------------------------------------------------------------
def preview(spec: DataSpec, tokenizer: Any, index: int, table: Table | None = None) -> Preview:
    """Row `index` (0-based, counting bad rows too) of the training file as it will train. Pass a `table` from
    `read_table` to avoid re-reading the file on every call."""
    table = table or read_table(spec.train_path, spec.txt_mode)
    if not 0 <= index < len(table.records):
        raise DataError(f"row index {index} is out of range: the file has {len(table.records)} rows")
    record = table.records[index]
    fmt: Format = detect_format(table.columns, spec.columns) if spec.format == "auto" else spec.format
    overflow = _overflow(spec, fmt)
    renderer = Renderer(tokenizer, fmt, _columns(table, fmt, spec.columns))
    text = ""
    try:
        if record.values is None:
            raise RowProblem(record.problem or "unreadable")
        rendered = renderer.render(record.values)
    except RowProblem as exc:
        return Preview(record.file, record.row, fmt, text, (), 0, False, problem=str(exc))
    label = None if rendered.label is None else str(rendered.label)
    rows = _Rows([(record.file, record.row)], [rendered])
    rows.table = encode(tokenizer, [rendered], with_loss=fmt != "classification")
    if fmt == "classification":
        rows.table = ExampleTable(rows.table.ids, rows.table.loss, rows.table.starts, class_ids=np.zeros(1, np.int64))
    length = rows.table.token_count
    fitted, dropped = _fit(rows, overflow, spec, tokenizer)
    if dropped:
        return Preview(record.file, record.row, fmt, rendered.text, (), length, False, label, dropped[0].reason)
    shown = pieces(tokenizer, rendered)
    if overflow == "window" or length <= spec.max_length:
        flags, count = rows.table.loss, int(window_counts([length], spec.max_length, spec.stride)[0])
        kept = length
    else:
        flags, count, kept = fitted.loss[: fitted.token_count], 1, fitted.token_count
        if overflow == "truncate_left":
            shown = shown[length - kept:]
        elif fmt == "classification":
            shown = pieces(tokenizer, rendered, truncate_to=spec.max_length)
        else:
            shown = shown[:kept]
    tokens = tuple(zip(shown[:PREVIEW_TOKENS], flags[:PREVIEW_TOKENS].tolist()))
    return Preview(record.file, record.row, fmt, rendered.text, tokens, length, kept < length, label, kept=kept,
                   windows=count)


# -- batches -----------------------------------------------------------------------------------------------------------
def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask, labels (-100 on padding and non-loss tokens; class ids for
    classification). Packed examples give position_ids instead of attention_mask: call the model with
    use_cache=False so that each packed example attends only to itself (see the module docstring); the padding then
    forms a block of its own. Filled in numpy: torch.tensor reads a tuple of ints 7x slower, and on a GPU the host's
    time for a step is the step's time (2.4 ms a step of 8 x 1024 tokens, here 0.3)."""
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e.input_ids) for e in examples)
    lengths = [len(e.input_ids) for e in examples]
    input_ids = np.full((len(examples), width), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(examples), width), dtype=np.int64)
    for i, (example, n) in enumerate(zip(examples, lengths)):
        input_ids[i, :n] = example.input_ids
        attention_mask[i, :n] = 1
    if examples[0].class_id is not None:
        labels = np.array([e.class_id for e in examples], dtype=np.int64)
        return _tensors(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    labels = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
    for i, example in enumerate(examples):
        labels[i, : len(example.labels)] = example.labels
    if examples[0].position_ids is None:
        return _tensors(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    position_ids = np.zeros((len(examples), width), dtype=np.int64)
    for i, (example, n) in enumerate(zip(examples, lengths)):
        position_ids[i, :n] = example.position_ids
        position_ids[i, n:] = np.arange(width - n)
    return _tensors(input_ids=input_ids, position_ids=position_ids, labels=labels)


def _tensors(**arrays: np.ndarray) -> dict[str, Any]:
    import torch

    return {name: torch.from_numpy(array) for name, array in arrays.items()}
