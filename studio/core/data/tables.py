"""Data files in, raw records out: CSV/TSV, JSON, JSONL, Parquet and TXT (a file or a folder of .txt files).

Parquet goes through `datasets.load_dataset("parquet")`. CSV and JSON are read with the standard library instead of
`datasets`: its pandas CSV reader silently turns a surplus field into an index column or drops it, and one
undecodable JSON line or one value of another type fails a whole file without a row number. Here each such row
becomes a `Record` with a `problem`, which dataset.py reports as a bad row; nothing disappears unreported.

Row numbers are 1-based: the line where the record starts in CSV, JSONL and TXT files (what an editor shows; the
CSV header is line 1), the record's position in JSON arrays, Parquet files and hub datasets. TXT files hold one
document per file (`txt_mode="file"`) or one per blank-line-separated block (`"blocks"`), in a column named `text`.
A path that names no file but reads as a hub dataset id (`owner/name[:config][@split]`) loads through hub.py.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from studio.core.data.hub import HubSource, fingerprint, open_hub_dataset, parse_hub_id
from studio.core.errors import DataError
from studio.core.logs import route_library_logger

TxtMode = Literal["file", "blocks"]
SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt")


@dataclass(frozen=True)
class Record:
    """One raw row: its values, or the reason it could not even be read."""

    file: str
    row: int
    values: Mapping[str, Any] | None
    problem: str | None = None


@dataclass(frozen=True)
class Table:
    """The records of a file (or of a folder of .txt files); `columns` lists every key seen, first seen first."""

    path: str
    columns: tuple[str, ...]
    records: tuple[Record, ...]


def read_table(path: str | Path, txt_mode: TxtMode = "file") -> Table:
    """All records of a data file (or a folder of .txt files). Raises DataError when nothing can be read."""
    p = Path(path).expanduser()
    if not p.exists():
        return _read_hub(str(path), _hub_source(path))
    try:
        if p.is_dir():
            texts = sorted(p.glob("*.txt"))
            if not texts:
                raise DataError(f"{p} holds no .txt files")
            records = [r for text in texts for r in _read_txt(text, txt_mode)]
        elif p.suffix.lower() in (".csv", ".tsv"):
            records = _read_csv(p)
        elif p.suffix.lower() == ".jsonl":
            records = _read_jsonl(p)
        elif p.suffix.lower() == ".json":
            records = _read_json(p)
        elif p.suffix.lower() == ".parquet":
            records = _read_parquet(p)
        elif p.suffix.lower() == ".txt":
            records = _read_txt(p, txt_mode)
        else:
            raise DataError(f"{p.name}: unsupported file type; use {', '.join(SUFFIXES)} or a folder of .txt files")
    except OSError as exc:
        raise DataError(f"cannot read {p}: {exc.strerror or exc}") from exc
    if not records:
        raise DataError(f"{p} holds no rows")
    columns: dict[str, None] = {}
    for record in records:
        columns.update(dict.fromkeys(record.values or {}))
    return Table(str(p), tuple(columns), tuple(records))


def source_fingerprint(path: str | Path, txt_mode: TxtMode = "file") -> str:
    """A digest of what `read_table(path, txt_mode)` would read, without parsing it: the bytes of the file (or of
    each .txt file of a folder, with their names), or a hub dataset's prepared files."""
    p = Path(path).expanduser()
    if not p.exists():
        return fingerprint(open_hub_dataset(_hub_source(path)))
    digest = hashlib.sha256(f"{txt_mode}\0".encode())
    try:
        for file in sorted(p.glob("*.txt")) if p.is_dir() else [p]:
            digest.update(f"{file.name}\0".encode())
            with file.open("rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
    except OSError as exc:
        raise DataError(f"cannot read {p}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def absolute_source(path: str) -> str:
    """A local file's absolute path (a run file must work from any folder); a hub dataset id as it is."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() or parse_hub_id(path) is None else path


def _hub_source(path: str | Path) -> HubSource:
    source = parse_hub_id(str(path))
    if source is None:
        raise DataError(f"no such file or folder: {path}")
    return source


def _read_hub(name: str, source: HubSource) -> Table:
    dataset = open_hub_dataset(source)
    records = tuple(Record(name, row, values) for row, values in enumerate(dataset.to_list(), 1))
    if not records:
        raise DataError(f"the hub dataset {source} holds no rows")
    return Table(name, tuple(dataset.column_names), records)


def _decodes(text: str) -> bool:
    """False when the text holds bytes that were not UTF-8 (kept as surrogates by errors='surrogateescape')."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_csv(path: Path) -> list[Record]:
    file = str(path)
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        try:
            header = next(reader, None)
            if header is None:
                return []
            if not all(_decodes(name) for name in header):
                raise DataError(f"{file}: the header line is not valid UTF-8")
            records, start = [], reader.line_num + 1
            for fields_ in reader:
                row, start = start, reader.line_num + 1
                if not fields_:
                    continue  # a blank line
                if len(fields_) != len(header):
                    records.append(Record(file, row, None, f"has {len(fields_)} fields, the header has {len(header)}"))
                elif not all(_decodes(value) for value in fields_):
                    records.append(Record(file, row, None, "is not valid UTF-8"))
                else:
                    records.append(Record(file, row, dict(zip(header, fields_))))
        except csv.Error as exc:  # a NUL byte, an unterminated quote at the end: the reader cannot go on
            raise DataError(f"{file}, line {reader.line_num}: not readable as CSV ({exc})") from exc
    return records


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    file = str(path)
    with path.open("rb") as handle:
        for row, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8-sig" if row == 1 else "utf-8")
            except UnicodeDecodeError:
                records.append(Record(file, row, None, "is not valid UTF-8"))
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                records.append(Record(file, row, None, f"is not valid JSON ({exc.msg} at column {exc.colno})"))
                continue
            except RecursionError:
                records.append(Record(file, row, None, "is nested too deeply to read"))
                continue
            records.append(_object_record(file, row, value))
    return records


def _object_record(file: str, row: int, value: Any) -> Record:
    if isinstance(value, dict):
        return Record(file, row, value)
    return Record(file, row, None, f"is a JSON {type(value).__name__}, expected an object")


def _read_json(path: Path) -> list[Record]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}, line {line}: not valid UTF-8") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several JSON values: JSON lines under a .json name
            return _read_jsonl(path)
        raise DataError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    except RecursionError as exc:
        raise DataError(f"{path} is nested too deeply to read") from exc
    if isinstance(data, dict):  # {"data": [...]} and the like: one list of rows under one key
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path} holds a JSON object; expected a list of rows (or one key holding that list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}; expected a list of rows")
    return [_object_record(str(path), row, value) for row, value in enumerate(data, 1)]


def _read_parquet(path: Path) -> list[Record]:
    import datasets

    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    route_library_logger("datasets")  # its stderr handler would print a second line for a broken file
    try:
        table = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001 - pyarrow and datasets raise many types for a broken file
        raise DataError(f"cannot read {path} as Parquet: {str(exc).strip().splitlines()[0]}") from exc
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    return [Record(str(path), row, values) for row, values in enumerate(table, 1)]


def _read_txt(path: Path, mode: TxtMode) -> list[Record]:
    file = str(path)
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    if mode == "file":
        lines = text.splitlines()
        bad = next((n for n, line in enumerate(lines, 1) if not _decodes(line)), None)
        if bad is not None:
            return [Record(file, 1, None, f"line {bad} is not valid UTF-8")]
        return [Record(file, 1, {"text": text})]
    records: list[Record] = []
    block: list[str] = []
    start = 0
    for n, line in enumerate([*text.splitlines(), ""], 1):
        if line.strip():
            start = start if block else n
            block.append(line)
            continue
        if block:
            joined = "\n".join(block)
            ok = _decodes(joined)
            records.append(Record(file, start, {"text": joined} if ok else None, None if ok else "is not valid UTF-8"))
            block = []
    return records


