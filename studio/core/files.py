"""Atomic writes, in one place: a file or a folder is either all there or not there at all. Each is written
under a temp name beside its target, flushed to disk, and renamed into place; a failed write leaves the earlier
file or folder as it was and no temp behind."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from studio.core.errors import ExportError, StudioError, first_line


def write_atomic(path: str | Path, text: str) -> None:
    """Write text to `path` through a temporary file in the same folder and a rename: never half a file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise StudioError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise StudioError(f"cannot write {path}: {exc.strerror or exc}") from exc


@contextmanager
def atomic_folder(target: Path, what: str) -> Iterator[Path]:
    """Yield a temp folder next to `target`; once the block completes, it becomes `target`. On any failure the
    temp folder is removed and an earlier `target` stays as it was; write errors become ExportError."""
    check_folder_target(target, what)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    except OSError as exc:
        raise ExportError(f"cannot write the {what} to {target}: {write_failure(exc)}") from exc
    try:
        yield staging
        _swap_into_place(staging, target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        reason = write_failure(exc)
        if reason is not None:
            raise ExportError(f"cannot write the {what} to {target}: {reason}") from exc
        raise


def check_folder_target(target: Path, what: str) -> None:
    """ExportError when `target` cannot become a folder because it, or a folder above it, is a file: callers check
    this before minutes of work, not after."""
    blocker = next((p for p in (target, *target.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ExportError(f"cannot write the {what} to {target}: {blocker} is a file, not a folder")


def _swap_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
        return
    retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(retired)
    try:
        staging.rename(target)
    except OSError:
        retired.rename(target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def write_failure(exc: BaseException | None) -> str | None:
    """The reason a write failed, in words, or None when `exc` is not a write failure (a bug keeps its trace)."""
    if isinstance(exc, OSError):
        reason, full = exc.strerror or first_line(exc), exc.errno == errno.ENOSPC
    elif type(exc).__name__ == "SafetensorError" and (io_error := re.search(r"I/O error: (.+)", str(exc))):
        # safetensors reports OS errors inside its own type, e.g. "No space left on device (os error 28)"
        reason = re.sub(r" \(os error \d+\)$", "", io_error.group(1))
        full = io_error.group(1).endswith(f"(os error {errno.ENOSPC})")
    elif isinstance(exc, (RuntimeError, StudioError)):  # torch.save and our own wrappers keep the OSError as cause
        return write_failure(exc.__cause__ or exc.__context__)
    else:
        return None
    return f"{reason} (free some space or choose another folder)" if full else reason
