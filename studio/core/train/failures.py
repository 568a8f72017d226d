"""What a run that ended on an exception tells the person: one line naming the step and what to change. A bug
(an exception the studio does not expect) keeps its traceback in the run folder's error.log, written only where
there is room for it."""

from __future__ import annotations

import errno
import traceback
from pathlib import Path

from studio.core import run_layout
from studio.core.errors import StudioError, WriteError, first_line
from studio.core.files import write_atomic, write_failure
from studio.core.runconfig import RunConfig

DEFAULT_MAX_LENGTH = 512  # DataSpec's, for a run file that does not set it


def failure_line(exc: BaseException, step: int, config: RunConfig, run_dir: Path, *, log: Path | None = None) -> str:
    """The one line for `exc`, raised while the run worked on the step after `step` (the steps done). A bug's
    traceback goes to `log` (the run folder's error.log by default)."""
    if isinstance(exc, StudioError):
        return first_line(exc)
    if is_out_of_memory(exc):
        return out_of_memory_line(step + 1, config)
    if isinstance(exc, OSError):
        where = exc.filename or run_dir
        if exc.errno == errno.ENOSPC:
            return f"the disk is full ({where}) at step {step + 1}: free some space, then resume"
        return f"cannot read or write {where}: {write_failure(exc)}"
    return internal_error_line(exc, log or run_dir / run_layout.ERROR_LOG)


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def out_of_memory_line(step: int, config: RunConfig) -> str:
    """What to change when the GPU ran out of memory at `step`: only the levers this run has not pulled yet."""
    t = config.training
    levers = [f"lower the batch size (now {t.batch_size}) or the maximum length "
              f"(now {config.data.get('max_length') or DEFAULT_MAX_LENGTH})"]
    if not t.gradient_checkpointing:
        levers.append("turn on gradient checkpointing")
    if not config.model.quantization:
        levers.append("load the base in 4-bit")
    listed = levers[0] if len(levers) == 1 else ", ".join(levers[:-1]) + f" or {levers[-1]}"
    return f"out of GPU memory at step {step}: {listed}; then resume from the last checkpoint"


def internal_error_line(exc: BaseException, log: Path) -> str:
    """A bug: its traceback goes to `log`, the line says where."""
    what = f"internal error ({type(exc).__name__}: {first_line(exc)})"
    try:
        write_atomic(log, "".join(traceback.format_exception(exc)))
    except WriteError as write_error:
        return f"{what}; its details could not be saved ({first_line(write_error)})"
    return f"{what}; details in {log}"
