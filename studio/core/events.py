"""Typed events the engine emits through its `on_event` callback. Plain frozen dataclasses: the GUI's worker
re-emits each as one Qt signal argument, the CLI prints and logs them, tests assert on them. `Recorder` is the
engine's side: it writes each event's record to the run folder before passing the event on."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Callable

from studio.core import run_layout


@dataclass(frozen=True)
class RunStarted:
    run_dir: str
    model: str
    device: str
    plan: dict[str, Any]
    counts: dict[str, Any]  # PlanCounts.to_dict()
    train_examples: int
    val_examples: int
    total_steps: int
    start_step: int = 0  # > 0 when resuming
    processes: int = 1  # accelerate's processes (one per GPU) training together


@dataclass(frozen=True)
class StepMetrics:
    step: int
    total_steps: int
    epoch: float
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float  # non-padding tokens only
    tokens_seen: int
    elapsed_s: float
    eta_s: float
    gpu_mem_bytes: int | None = None  # peak allocated since the last step (the largest of all GPUs), None on CPU
    gpu_mem_per_device: tuple[int, ...] | None = None  # each process's GPU peak, when there are several
    # real (non-padding) tokens over the positions the model computed: 1.0 without padding; packing raises it
    token_efficiency: float | None = None


@dataclass(frozen=True)
class EvalMetrics:
    step: int
    val_loss: float
    score: float | None = None  # task score (exact match, accuracy) where the data defines one
    score_name: str | None = None


@dataclass(frozen=True)
class ModuleSpectrum:
    """Singular values of ΔW = scaling·B·A for one adapted module, largest first."""

    name: str
    values: tuple[float, ...]
    rank: int
    effective_rank_90: int  # smallest k holding 90% of the energy (sum of squared singular values)
    effective_rank_95: int
    top1_energy: float  # share of the energy in the largest singular value


@dataclass(frozen=True)
class SpectrumSnapshot:
    step: int
    modules: tuple[ModuleSpectrum, ...]


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    path: str


@dataclass(frozen=True)
class Paused:
    step: int
    checkpoint: str | None


@dataclass(frozen=True)
class Resumed:
    step: int


@dataclass(frozen=True)
class Finished:
    step: int
    run_dir: str
    adapter_dir: str
    stopped_early: bool  # True when the user stopped the run
    final_loss: float | None
    final_val_loss: float | None = None
    final_score: float | None = None


@dataclass(frozen=True)
class Failed:
    message: str  # one line a person can act on
    step: int
    checkpoint: str | None = None  # the last usable checkpoint, if any


@dataclass(frozen=True)
class LogMessage:
    text: str
    level: str = "info"


Event = (
    RunStarted | StepMetrics | EvalMetrics | SpectrumSnapshot | CheckpointSaved | Paused | Resumed | Finished
    | Failed | LogMessage
)


def describe(event: Event) -> str | None:
    """The event in words, one line, as the CLI and the window's log both say it. None for the events shown
    otherwise: each step's metrics move a progress bar and the plots, spectra fill their own panel."""
    if isinstance(event, RunStarted):
        steps = (f"from step {event.start_step} to {event.total_steps}" if event.start_step
                 else f"{event.total_steps} steps")
        processes = f" × {event.processes} processes" if event.processes > 1 else ""
        return (f"Run folder {event.run_dir}: {event.model} on {event.device}{processes}, "
                f"{event.counts.get('trainable', 0):,} trainable parameters, {event.train_examples} training / "
                f"{event.val_examples} validation examples, {steps}")
    if isinstance(event, EvalMetrics):
        score = f", {event.score_name} {event.score:.3f}" if event.score is not None else ""
        return f"Step {event.step}: validation loss {event.val_loss:.4f}{score}"
    if isinstance(event, CheckpointSaved):
        return f"Checkpoint at step {event.step}: {event.path}"
    if isinstance(event, Paused):
        return f"Paused at step {event.step} (checkpoint {event.checkpoint})"
    if isinstance(event, Resumed):
        return f"Resumed at step {event.step}"
    if isinstance(event, LogMessage):
        return event.text
    if isinstance(event, Finished):
        loss = f", last loss {event.final_loss:.4f}" if event.final_loss is not None else ""
        score = f", score {event.final_score:.3f}" if event.final_score is not None else ""
        return (f"{'Stopped' if event.stopped_early else 'Finished'} at step {event.step}{loss}{score}; "
                f"adapter saved to {event.adapter_dir}")
    if isinstance(event, Failed):
        where = f" (last checkpoint: {event.checkpoint})" if event.checkpoint else ""
        # a run refused before its first step is not said to have failed "at step 0"
        when = f"Failed at step {event.step}: " if event.step else ""
        return f"{when}{event.message}{where}"
    return None


def to_record(event: Event) -> dict[str, Any]:
    """A JSON-ready dict with the event's type name, as written to metrics.jsonl."""
    record = {"event": type(event).__name__}
    record.update(asdict(event))
    return record


class Recorder:
    """Forwards events to the caller and appends them to metrics.jsonl (flushed per event: a crash loses nothing).
    `write=False` (the processes of a multi-process run other than the main one) writes nothing. A write that fails
    (a full disk) raises its OSError, except for the Failed event: that one reaches the caller even when there is
    no room left to record it."""

    def __init__(self, run_dir: Path, on_event: Callable[[Event], None], *, write: bool = True):
        self.path = run_dir / run_layout.METRICS
        self.on_event = on_event
        self.handle = _append_to(self.path) if write else None

    def __call__(self, event: Event) -> None:
        try:
            if self.handle is None:
                pass
            elif not isinstance(event, SpectrumSnapshot):  # spectra are large; they go to spectra.jsonl
                self.handle.write(json.dumps(to_record(event)) + "\n")
                self.handle.flush()
            else:
                with _append_to(self.path.parent / run_layout.SPECTRA) as spectra:
                    spectra.write(json.dumps(to_record(event)) + "\n")
        except OSError:
            if not isinstance(event, Failed):
                raise
        self.on_event(event)

    def close(self) -> None:
        if self.handle is None:
            return
        try:
            self.handle.close()
        except OSError:  # the last records found no room; the failure was reported as the run's end
            pass


def _append_to(path: Path) -> IO[str]:
    """Open a records file for appending. A line cut short (the process was killed mid-write) is ended first, so
    the next record starts a line of its own instead of being glued to the broken one and lost with it."""
    handle = path.open("a", encoding="utf-8")
    if handle.tell() > 0:
        with path.open("rb") as existing:
            existing.seek(-1, 2)
            if existing.read(1) != b"\n":
                handle.write("\n")
    return handle
