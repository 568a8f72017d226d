"""A run folder as the engine writes it (run.yaml, metrics.jsonl with one event per line, spectra.jsonl,
checkpoints/, adapter/), read back: its summary for the runs list and its events for the plots. The window and
the CLI both read run folders through here."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from studio.core import events as ev
from studio.core.runconfig import load
from studio.core.train.checkpoints import latest_checkpoint


@dataclass(frozen=True)
class RunSummary:
    """One run folder as the list shows it; `losses` are (step, loss) of its StepMetrics records and
    `val_losses` (step, validation loss) of its EvalMetrics records. `model` is the run's base (what
    open_model accepts), `task` its model.task."""

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
    losses: tuple[tuple[int, float], ...]
    val_losses: tuple[tuple[int, float], ...] = ()

    @property
    def resumable(self) -> bool:
        return latest_checkpoint(self.folder) is not None

    @property
    def adapter(self) -> Path | None:
        return run_adapter(self.folder)


def run_adapter(run_dir: Path) -> Path | None:
    """The run's final adapter, else its newest checkpoint's; None before either exists."""
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        return run_dir / "adapter"
    checkpoint = latest_checkpoint(run_dir)
    return checkpoint / "adapter" if checkpoint is not None else None


# what the studio's writers stage or set aside beside a run's files (files.py, checkpoints.py) and what a killed
# process leaves behind: `.adapter.partial-*`, `.adapter.old-*`, `.run.yaml.<random>`, `checkpoints/.step-*`
LEFTOVER_PATTERNS = (".adapter.partial-*", ".adapter.old-*", ".run.yaml.*", ".metrics.jsonl.*", ".error.log.*",
                     "checkpoints/.step-*")


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete the hidden staging files and folders a killed run left in its folder; returns what went."""
    removed = [p for pattern in LEFTOVER_PATTERNS for p in folder.glob(pattern)]
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def read_records(folder: Path, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
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


def read_run(folder: Path) -> RunSummary:
    """Summarise a run folder. Raises StudioError when its run.yaml is missing or unreadable."""
    config = load(folder / "run.yaml")
    records = read_records(folder)
    steps, evals = latest_history(records)
    last_end = next((r for r in reversed(records) if r.get("event") in ("Finished", "Failed")), None)
    if last_end is None:
        status = "interrupted" if steps else "not started"
    elif last_end["event"] == "Failed":
        status = f"failed: {last_end.get('message', '')}"
    else:
        status = "stopped" if last_end.get("stopped_early") else "finished"
    scores = [r["score"] for r in evals if r.get("score") is not None]
    plan = config.plan
    targets = plan.get("targets")
    shown_targets = targets if isinstance(targets, str) else f"{len(targets or ())} modules"
    return RunSummary(
        folder=folder, model=config.model.source, task=config.model.task,
        targets=f"{shown_targets} · r={plan.get('rank', 8)}", data=Path(str(config.data.get("train_path", ""))).name,
        steps_done=steps[-1]["step"] if steps else 0, total_steps=config.training.max_steps, status=status,
        final_loss=steps[-1]["loss"] if steps else None, score=scores[-1] if scores else None,
        losses=tuple((int(r["step"]), float(r["loss"])) for r in steps),
        val_losses=tuple((int(r["step"]), float(r["val_loss"])) for r in evals),
    )
