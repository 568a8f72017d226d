"""Progress of a long job (opening a model, merging, writing a GGUF file): one frozen `Progress` handed to a
callback, and `scaled` to give a sub-task its share of the parent's bar. Each job reports 0 to 1 of its own
work; the caller that runs it inside a larger job decides the share, so no job knows who embeds it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable


@dataclass(frozen=True)
class Progress:
    """A stage of a job: `fraction` runs from 0 to 1 over the whole job."""

    stage: str
    fraction: float
    message: str


ProgressCallback = Callable[[Progress], None]


def ignore(_progress: Progress) -> None:
    """The callback of a caller that does not listen."""


def scaled(callback: ProgressCallback | None, start: float, end: float,
           stage: str | None = None) -> ProgressCallback:
    """A callback for a sub-task that fills `start`..`end` of its parent's progress: the sub-task's 0 to 1 is
    mapped there. `stage` names every report of the sub-task as one stage of the parent (its messages stay)."""
    if callback is None:
        return ignore
    report = callback

    def on_progress(progress: Progress) -> None:
        f = progress.fraction  # written so that 0 and 1 land exactly on start and end, with no rounding past them
        report(replace(progress, fraction=start * (1 - f) + end * f, stage=stage or progress.stage))

    return on_progress
