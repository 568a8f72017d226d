"""Resuming a run without losing any of it.

`resume_point` finds the checkpoint a resume starts from; `check_resume` refuses, before anything is read or written,
a resume that would train nothing, replace a finished adapter with an earlier one, or switch optimizers. `HeldRecord`
keeps a resume's events out of the run folder until its setup has worked (model, data and checkpoint loaded); only
then is the history after the checkpoint trimmed, run.yaml updated with any changed settings, and the events recorded.
A resume that fails before that leaves every file of the run as it was.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from studio.core import events as ev
from studio.core import run_layout
from studio.core.errors import TrainingError
from studio.core.files import write_atomic
from studio.core.run_layout import is_run_folder
from studio.core.runconfig import RunConfig, TrainingConfig, dump, load
from studio.core.train.checkpoints import latest_checkpoint, read_state, trim_history
from studio.core.train.run_folder import read_records


def resume_point(resume_from: Path, run_dir: Path | None) -> tuple[Path, Path | None]:
    """(run folder, checkpoint) for `resume_from`: a run folder (its latest checkpoint) or a checkpoint folder. A run
    killed before its first checkpoint (no checkpoint, no adapter) resumes from the start: checkpoint None."""
    if is_run_folder(resume_from):
        checkpoint = latest_checkpoint(resume_from)
        if checkpoint is None and (resume_from / run_layout.ADAPTER).is_dir():
            raise TrainingError(f"{resume_from} has no checkpoint to resume from")
        return resume_from, checkpoint
    return Path(run_dir or resume_from.parent.parent), resume_from


def check_resume(config: RunConfig, run_dir: Path, checkpoint: Path | None) -> int:
    """The checkpoint's step, once it is clear that resuming it with `config` trains something and loses nothing."""
    start = read_state(checkpoint).step if checkpoint is not None else 0
    stored = load(run_dir / run_layout.RUN_FILE)
    budget = config.training.max_steps  # None for a run given in epochs: checked once the data says its steps
    if budget is not None and budget <= start:
        raise TrainingError(f"the latest checkpoint of {run_dir} is at step {start}: a resume needs more than {start} "
                            f"steps to train (max steps is {budget})")
    finished = finished_step(run_dir)
    if finished is not None and budget is not None and budget < finished:
        raise TrainingError(f"{run_dir} finished at step {finished}: resuming it to step {budget} would replace its "
                            f"adapter with an earlier one; give at least {finished} steps, or export it first")
    if config.training.optimizer != stored.training.optimizer:
        raise TrainingError(f"the optimizer cannot change on resume: the checkpoint holds {stored.training.optimizer}'s "
                            "state")
    return start


def finished_step(run_dir: Path) -> int | None:
    """The step the run finished at (not stopped early), when its last end record says it finished."""
    ends = [r for r in read_records(run_dir) if r.get("event") in ("Finished", "Failed")]
    if ends and ends[-1]["event"] == "Finished" and not ends[-1].get("stopped_early"):
        return int(ends[-1]["step"])
    return None


def changed_settings(before: TrainingConfig, after: TrainingConfig) -> list[str]:
    """'learning_rate 1e+12 -> 0.001' for each training setting `after` changes."""
    return [f"{f.name} {getattr(before, f.name)!r} -> {getattr(after, f.name)!r}"
            for f in dataclasses.fields(TrainingConfig) if getattr(before, f.name) != getattr(after, f.name)]


class HeldRecord:
    """A resume's event sink: each event goes to the caller at once and into the run folder only after `commit`."""

    def __init__(self, run_dir: Path, on_event: Callable[[ev.Event], None], start_step: int,
                 config: RunConfig, *, write: bool = True) -> None:
        self.run_dir = run_dir
        self.on_event = on_event
        self.start_step = start_step
        self.config = config
        self.write = write  # False on the processes of a multi-process run other than the main one
        self.held: list[ev.Event] = []
        self.recorder: ev.Recorder | None = None

    def __call__(self, event: ev.Event) -> None:
        if self.recorder is not None:
            self.recorder(event)
        else:
            self.held.append(event)
            self.on_event(event)

    def commit(self) -> None:
        """Setup worked: trim the history after the checkpoint, store changed settings in run.yaml, record what
        setup reported, and record every later event as it comes."""
        if not self.write:
            self.recorder = ev.Recorder(self.run_dir, self.on_event, write=False)
            return
        changes = changed_settings(load(self.run_dir / run_layout.RUN_FILE).training, self.config.training)
        trim_history(self.run_dir, self.start_step)
        if changes:
            write_atomic(self.run_dir / run_layout.RUN_FILE, dump(self.config))
        recorder = ev.Recorder(self.run_dir, lambda _event: None)
        for event in self.held:
            recorder(event)
        recorder.on_event = self.on_event  # from here on the recorder passes each event on
        self.recorder = recorder
        if changes:
            self(ev.LogMessage(f"resumed with changed settings: {', '.join(changes)}"))

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
