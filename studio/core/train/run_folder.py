"""A run folder as the engine writes it (run.yaml, metrics.jsonl with one event per line, spectra.jsonl,
checkpoints/, adapter/), read back: its summary for the runs list, its loss curves and its events for the plots,
its last spectrum snapshot. The window and the CLI both read run folders through here.

A list of runs reads only what it shows: the summary parses the few records it needs from the end of
metrics.jsonl (the others are recognised by their event name and skipped), and the last spectrum is read from
the end of spectra.jsonl, whose records are large. Curves, which need every step, are read only when asked."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator

from studio.core import events as ev
from studio.core import run_layout
from studio.core.adapters.folder import run_adapter
from studio.core.files import is_temp_name
from studio.core.runconfig import load
from studio.core.train.checkpoints import latest_checkpoint

BLOCK_BYTES = 1 << 16  # read backwards in blocks of this size
EVENT_PREFIX = b'{"event": "'  # how every record line starts (events.to_record, json.dumps)
END_EVENTS = ("Finished", "Failed")


@dataclass(frozen=True)
class RunSummary:
    """One run folder as the list shows it. `model` is the run's base (what open_model accepts), `task` its
    model.task."""

    folder: Path
    model: str
    task: str
    targets: str
    data: str
    steps_done: int
    total_steps: int
    status: str  # finished, stopped, failed: <why>, interrupted (no end record), or not started
    final_loss: float | None
    score: float | None

    @property
    def resumable(self) -> bool:
        return latest_checkpoint(self.folder) is not None

    @property
    def adapter(self) -> Path | None:
        return run_adapter(self.folder)


@dataclass(frozen=True)
class RunCurves:
    """(step, loss) of a run's StepMetrics records and (step, validation loss) of its EvalMetrics records, as
    the run stands (see latest_history)."""

    losses: tuple[tuple[int, float], ...]
    val_losses: tuple[tuple[int, float], ...]


# what the studio's writers stage or set aside in a run folder, which a killed process can leave behind: files.py's
# temp names (`.NAME.partial-XXXXXXXX`) beside run.yaml, metrics.jsonl, spectra.jsonl, error.log, adapter/ and
# tokenizer/, inside an adapter/ or tokenizer/ being replaced (its entries and its manifest), and in checkpoints/
# (a new step-N, or a step written again: `.step-N.partial-X` and its own staging `..step-N.partial-X.partial-Y`);
# checkpoints.py's `.step-N.retired-XXXXXXXX`, a checkpoint on its way out
LEFTOVER_PATTERNS = (".*.partial-*", f"{run_layout.ADAPTER}/.*.partial-*", f"{run_layout.TOKENIZER}/.*.partial-*",
                     f"{run_layout.CHECKPOINTS}/.*.partial-*", f"{run_layout.CHECKPOINTS}/.step-*.retired-*")
_RETIRED = re.compile(r"\.step-\d+\.retired-[0-9a-f]{8}")  # checkpoints.retire's name


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete the hidden staging files and folders a killed run left in its folder (only the studio's temp names: a
    person's `.notes.partial-draft` stays); returns what went."""
    removed = [p for pattern in LEFTOVER_PATTERNS for p in folder.glob(pattern)
               if is_temp_name(p.name) or _RETIRED.fullmatch(p.name)]
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def read_records(folder: Path, name: str = run_layout.METRICS) -> list[dict[str, Any]]:
    """The event records of a run file; a line cut short by a crash is skipped."""
    path = folder / name
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def lines_from_end(path: Path, block: int = BLOCK_BYTES) -> Iterator[bytes]:
    """The file's non-empty lines, last first, read backwards a block at a time: a reader that stops early
    pays only for the tail. The last line may be one a crash cut short (no newline): callers parse and skip."""
    with path.open("rb") as handle:
        position = handle.seek(0, os.SEEK_END)
        rest = b""  # the start of a line that began in an earlier block
        while position > 0:
            size = min(block, position)
            position -= size
            handle.seek(position)
            lines = (handle.read(size) + rest).split(b"\n")
            rest = lines[0]
            yield from (line for line in reversed(lines[1:]) if line)
        if rest:
            yield rest


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a line cut short by a crash
    return record if isinstance(record, dict) else None


def _event_name(line: bytes) -> str | None:
    """The record's event name read from the line's start without parsing it (None when the line does not
    start the usual way: then it has to be parsed)."""
    if not line.startswith(EVENT_PREFIX):
        return None
    end = line.find(b'"', len(EVENT_PREFIX))
    return line[len(EVENT_PREFIX):end].decode("ascii", "replace") if end > 0 else None


def read_last_record(folder: Path, name: str, event: str) -> dict[str, Any] | None:
    """The last complete `event` record of a run file, read from the end; None when it holds none."""
    path = folder / name
    if not path.is_file():
        return None
    for line in lines_from_end(path):
        if _event_name(line) not in (event, None):
            continue
        record = _parse(line)
        if record is not None and record.get("event") == event:
            return record
    return None


def event_from(record: dict[str, Any]) -> Any:
    """The core event a metrics.jsonl record was written from (None for a type this version does not know)."""
    kind = getattr(ev, str(record.get("event")), None)
    if kind is None or not hasattr(kind, "__dataclass_fields__"):
        return None
    values = {f.name: record[f.name] for f in fields(kind) if f.name in record}
    if kind is ev.SpectrumSnapshot:
        values["modules"] = tuple(ev.ModuleSpectrum(**{**m, "values": tuple(m["values"])}) for m in values["modules"])
    return kind(**values)


def latest_history(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The StepMetrics and EvalMetrics records of the run as it stands: a resume from an earlier checkpoint
    redid the steps after it, so its records replace theirs."""
    steps: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for record in records:
        kind = record.get("event")
        if kind == "RunStarted" and record.get("start_step"):
            start = int(record["start_step"])
            steps = [r for r in steps if r["step"] <= start]
            evals = [r for r in evals if r["step"] <= start]
        elif kind == "StepMetrics":
            steps.append(record)
        elif kind == "EvalMetrics":
            evals.append(record)
    return steps, evals


@dataclass
class _Tail:
    """What the summary needs, gathered newest record first: the last step, the last score and the last end
    record. A run that never scored is read to its start, but its step lines are only recognised, not parsed."""

    last_step: dict[str, Any] | None = None
    score: float | None = None
    end: dict[str, Any] | None = None
    cap: float = float("inf")  # a resume from step s replaced the records after s that were written before it

    def take(self, kind: str | None, line: bytes) -> None:
        wanted = (kind in (None, "RunStarted") or (kind == "StepMetrics" and self.last_step is None)
                  or (kind == "EvalMetrics" and self.score is None) or (kind in END_EVENTS and self.end is None))
        record = _parse(line) if wanted else None
        if record is None:
            return
        kind = record.get("event")
        if kind == "RunStarted" and record.get("start_step"):
            self.cap = min(self.cap, int(record["start_step"]))
        elif kind in END_EVENTS and self.end is None:
            self.end = record
        elif kind == "StepMetrics" and self.last_step is None and record["step"] <= self.cap:
            self.last_step = record
        elif kind == "EvalMetrics" and self.score is None and record.get("score") is not None \
                and record["step"] <= self.cap:
            self.score = record["score"]

    @property
    def complete(self) -> bool:
        return self.last_step is not None and self.score is not None and self.end is not None


def read_run(folder: Path) -> RunSummary:
    """Summarise a run folder. Raises StudioError when its run.yaml is missing or unreadable."""
    config = load(folder / run_layout.RUN_FILE)
    tail = _Tail()
    path = folder / run_layout.METRICS
    if path.is_file():
        for line in lines_from_end(path):
            tail.take(_event_name(line), line)
            if tail.complete:
                break
    last_step, last_end = tail.last_step, tail.end
    if last_end is None:
        status = "interrupted" if last_step is not None else "not started"
    elif last_end["event"] == "Failed":
        status = f"failed: {last_end.get('message', '')}"
    else:
        status = "stopped" if last_end.get("stopped_early") else "finished"
    plan = config.plan
    targets = plan.get("targets")
    shown_targets = targets if isinstance(targets, str) else f"{len(targets or ())} modules"
    return RunSummary(
        folder=folder, model=config.model.source, task=config.model.task,
        targets=f"{shown_targets} · r={plan.get('rank', 8)}", data=Path(str(config.data.get("train_path", ""))).name,
        steps_done=last_step["step"] if last_step else 0, total_steps=config.training.max_steps, status=status,
        final_loss=last_step["loss"] if last_step else None, score=tail.score,
    )


def read_curves(folder: Path) -> RunCurves:
    """The run's training and validation loss curves (every step: read them only for runs that are shown)."""
    steps, evals = latest_history(read_records(folder))
    return RunCurves(losses=tuple((int(r["step"]), float(r["loss"])) for r in steps),
                     val_losses=tuple((int(r["step"]), float(r["val_loss"])) for r in evals))
