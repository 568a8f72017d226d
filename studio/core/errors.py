"""Errors a user can cause. Each carries a one-line message a person can act on; the CLI prints it and exits 2,
the GUI shows it in a dialog. Anything that is not a StudioError is a bug and keeps its traceback."""

from __future__ import annotations

import difflib
from typing import Iterable


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty): what a one-line error can quote."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """": did you mean `x`?" for the choice nearest to a misspelt `word`, or "" when none is near."""
    close = difflib.get_close_matches(str(word), sorted(choices), n=1, cutoff=0.6)
    return f": did you mean `{close[0]}`?" if close else ""


class StudioError(Exception):
    """Base of every user-facing error."""


class ModelSourceError(StudioError):
    """The model to open cannot be found, read or built."""


class PlanError(StudioError):
    """The LoRA plan asks for something the model cannot do (unknown module, bad rank, ...)."""


class DataError(StudioError):
    """The dataset cannot be read or formatted as asked."""


class RunConfigError(StudioError):
    """A run file is missing a field or holds a value out of range."""


class TrainingError(StudioError):
    """Training stopped for a reason the user can act on (out of memory, NaN loss, full disk, ...)."""


class DivergedError(TrainingError):
    """The loss or the gradient became NaN or infinite: the weights the step started from are unusable."""


class ExportError(StudioError):
    """An adapter or merged model cannot be saved or loaded."""


class WriteError(StudioError):
    """A file or folder cannot be written: the disk is full, no permission, something in the way, or the place
    holds a person's own files, which the studio never replaces."""
