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
from typing import BinaryIO, Iterator

from studio.core.errors import ExportError, StudioError, first_line


def write_atomic(path: str | Path, text: str) -> None:
    """Write text to `path` through a temporary file in the same folder and a rename: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
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
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary handle on a temp file beside `path` that becomes `path` once the block completes (flushed to disk
    first); on any failure the temp file is removed and an earlier `path` stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cache_root() -> Path:
    """The studio's cache (converted models, prepared datasets): $LORA_STUDIO_CACHE, else
    $XDG_CACHE_HOME/lora-studio, else ~/.cache/lora-studio."""
    if os.environ.get("LORA_STUDIO_CACHE"):
        return Path(os.environ["LORA_STUDIO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lora-studio"


@contextmanager
def atomic_folder(target: Path, what: str) -> Iterator[Path]:
    """Yield a temp folder next to `target`; once the block completes, it becomes `target`. On any failure the
    temp folder is removed and an earlier `target` stays as it was; write errors become ExportError."""
    blocker = next((p for p in (target, *target.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ExportError(f"cannot write the {what} to {target}: {blocker} is a file, not a folder")
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


def write_failure(exc: BaseException) -> str | None:
    """The reason a write failed, in words, or None when `exc` is not a write failure (a bug keeps its trace)."""
    if isinstance(exc, OSError):
        reason = exc.strerror or first_line(exc)
        return f"{reason} (free some space or choose another folder)" if exc.errno == errno.ENOSPC else reason
    io_error = re.search(r"I/O error: (.+)", str(exc))  # safetensors reports OS errors inside its own type
    return io_error.group(1) if type(exc).__name__ == "SafetensorError" and io_error else None
