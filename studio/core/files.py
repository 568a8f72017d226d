"""Writing files and folders, in one place: atomically, and only where the studio may write.

Atomic: a file or a folder is written under a temp name (`.NAME.partial-XXXXXXXX`) next to where it goes, flushed
to disk and renamed into place; a failed write leaves what was there before and no temp behind. A rewritten file
keeps its mode; a new file or folder gets the usual one (the umask's).

Where: each folder the studio writes into gets a small manifest (MANIFEST) naming what it wrote there, with each
file's size and modification time. Whatever the manifest does not name, or that changed since, is a person's. The
studio writes a folder only where it is new, empty or its own; a folder holding a person's files is refused, unless
forced (`--force`), and even then only the studio's own entries are replaced: a person's file is never deleted or
overwritten. A folder the caller owns whole (a run's adapter or checkpoint, the studio's cache) is replaced as it
stands (`owned=True`). A single file (a .gguf) is written where it is new or the studio's, or when forced.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from studio.core.errors import StudioError, WriteError, first_line

MANIFEST = ".lora-studio-manifest"  # JSON: {"written_by": ..., "entries": {name: [[size, mtime_ns], ...]}}
DISK_FULL = "the disk is full: free some space, then try again"
_PARTIAL = re.compile(r"\..+\.partial-[0-9a-f]{8}")  # a temp name of this module's


# ---- atomic writes ---------------------------------------------------------------------------------------------

def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temp file and a rename: never half a file."""
    with atomic_file(path) as temp:
        temp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_file(path: str | Path, what: str | None = None) -> Iterator[Path]:
    """Yield a new, empty temp file beside `path` for any writer to fill (text, torch.save, a GGUF writer); once
    the block completes it is flushed to disk and renamed to `path`. A link is written through, not replaced.
    On a failure the temp file goes and `path` stays as it was; write failures become WriteError."""
    path = Path(path).expanduser()
    if path.is_symlink():
        path = path.resolve()
    _refuse_blocked(path.parent, path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = temp_name(path)
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies
    except OSError as exc:
        raise WriteError(_cannot(path, what, exc)) from exc
    try:
        yield temp
        _keep_mode(path, temp)
        _sync(temp)
        os.replace(temp, path)
        _sync(path.parent)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        reason = write_failure(exc)
        if reason is None:
            raise
        raise WriteError(_cannot(path, what, reason)) from exc


def cache_root() -> Path:
    """The studio's cache (converted models, prepared datasets): $LORA_STUDIO_CACHE, else
    $XDG_CACHE_HOME/lora-studio, else ~/.cache/lora-studio."""
    if os.environ.get("LORA_STUDIO_CACHE"):
        return Path(os.environ["LORA_STUDIO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lora-studio"


@contextmanager
def atomic_folder(target: str | Path, what: str, *, force: bool = False, owned: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder for the caller to fill; once the block completes, what it holds becomes `target`,
    flushed to disk and named in `target`'s manifest.

    `target` must be one the studio may write (`check_output_folder`; `force` as there), unless `owned`: the caller
    owns it whole and whatever is there is replaced. A new `target` is the temp folder renamed. An existing one keeps
    its inode and mode: the temp folder sits inside it, each entry is renamed into place (a replaced file keeps its
    mode) and the studio's earlier entries the new write lacks are removed; meanwhile the manifest names old and new,
    so a crash leaves a folder that is still the studio's. On a failure the temp folder goes and `target` stays as
    it was; write failures become WriteError.
    """
    target = Path(target).expanduser()
    if owned:
        _refuse_blocked(target, target, what)
    else:
        check_output_folder(target, what, force=force)
    existing = target.is_dir()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = temp_name((target if existing else target.parent) / target.name)
        os.mkdir(staging, 0o777)  # the umask applies
    except OSError as exc:
        raise WriteError(_cannot(target, what, exc)) from exc
    try:
        yield staging
        written = {path.name: [_fingerprint(path)] for path in staging.iterdir()}
        _sync_tree(staging)
        if existing:
            _move_into(staging, target, written, what, owned)
        else:
            _write_manifest(staging, written)
            staging.rename(target)
        _sync(target.parent)
        shutil.rmtree(staging, ignore_errors=True)  # inside an existing target: what was moved aside
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        reason = write_failure(exc)
        if reason is None:
            raise
        raise WriteError(_cannot(target, what, reason)) from exc


def _move_into(staging: Path, target: Path, written: dict[str, list], what: str, owned: bool) -> None:
    recorded = _read_manifest(target)
    present = {p.name for p in target.iterdir()} - {MANIFEST, staging.name}
    leftovers = {name for name in present if _PARTIAL.fullmatch(name)}  # temp folders of writes that crashed
    present -= leftovers
    ours = present if owned else present & studio_entries(target)
    theirs = sorted(set(written) & (present - ours))
    if theirs:
        raise WriteError(f"{target / theirs[0]} was not written by the studio and is never replaced: choose another "
                         f"folder for the {what}")
    # while entries are swapped the manifest accepts the old and the new version of each
    _write_manifest(target, {name: recorded.get(name, []) + written.get(name, []) for name in ours | set(written)})
    for name in written:
        new, old = staging / name, target / name
        if old.is_dir() and not old.is_symlink():
            old.rename(temp_name(staging / name))  # a folder cannot be renamed over: aside, removed with staging
        else:
            _keep_mode(old, new)
        os.replace(new, old)
    for name in sorted((ours - set(written)) | leftovers):
        _remove(target / name)
    _write_manifest(target, written)
    _sync(target)


# ---- where the studio may write --------------------------------------------------------------------------------

def check_output_folder(target: str | Path, what: str, *, force: bool = False) -> None:
    """Raise WriteError unless the studio may write the folder `target`: new, empty or its own; with `force` also
    one holding a person's files (which stay). Never a home folder, a file system's root or a run folder itself."""
    target = Path(target).expanduser()
    _refuse_blocked(target, target, what)
    try:
        resolved = target.resolve()
        shown = f"the current folder {resolved}" if resolved == Path.cwd().resolve() else str(target)
        if resolved in (Path.home().resolve(), Path(resolved.anchor)):
            raise WriteError(f"will not write the {what} into {shown} itself: name a new folder inside it, e.g. "
                             f"{target / what.replace(' ', '-')}")
        if (target / "run.yaml").is_file() and "run.yaml" not in studio_entries(target):
            raise WriteError(f"{shown} is a run folder: write the {what} to a new folder (one inside it is fine, "
                             f"e.g. {target / 'export'})")
        others = foreign_entries(target)
    except OSError as exc:
        raise WriteError(_cannot(target, what, exc)) from exc
    if others and not force:
        listed = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise WriteError(f"{shown} holds files the studio did not write ({listed}): choose a new or empty folder for "
                         f"the {what}, or use --force to write beside them (they are kept)")


def check_output_file(path: str | Path, what: str, *, force: bool = False) -> None:
    """Raise WriteError unless the studio may write the file `path`: new or its own, or any file with `force`."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise WriteError(f"{path} is a folder: name the {what} to write, e.g. {path / 'model'}")
    _refuse_blocked(path.parent, path, what)
    if (path.exists() or path.is_symlink()) and not force and not studio_wrote(path):
        raise WriteError(f"{path} exists and was not written by the studio: choose another name, or use --force to "
                         "replace it")


@contextmanager
def output_file(path: str | Path, what: str, *, force: bool = False) -> Iterator[Path]:
    """`atomic_file` for a file the studio writes among a person's files: only where `check_output_file` allows,
    and named in its folder's manifest (before the rename, so that no file of the studio's is ever unnamed)."""
    path = Path(path).expanduser()
    check_output_file(path, what, force=force)
    with atomic_file(path, what) as temp:
        yield temp
        _keep_mode(path, temp)
        recorded = _read_manifest(path.parent)
        kept = {name: recorded[name] for name in studio_entries(path.parent) - {path.name}}
        _write_manifest(path.parent, {**kept, path.name: [_fingerprint(temp)]})


def studio_wrote(path: str | Path) -> bool:
    """Whether the studio wrote `path` (its folder's manifest names it) and it is unchanged since."""
    path = Path(path)
    return path.name in studio_entries(path.parent)


def studio_entries(folder: str | Path) -> set[str]:
    """The names in `folder` the studio wrote and nobody changed since."""
    folder = Path(folder)
    ours = set()
    for name, prints in _read_manifest(folder).items():
        try:
            if _fingerprint(folder / name) in prints:
                ours.add(name)
        except OSError:  # gone since
            continue
    return ours


def foreign_entries(folder: str | Path) -> list[str]:
    """What `folder` holds that the studio did not write, sorted; [] for a folder that is not there."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return []
    ours = studio_entries(folder) | {MANIFEST}
    return sorted(p.name for p in folder.iterdir() if p.name not in ours and not _PARTIAL.fullmatch(p.name))


def _read_manifest(folder: Path) -> dict[str, list]:
    """{name: [fingerprint, ...]} as the manifest records it; {} for none or one that is not the studio's format."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        return {}
    return {name: prints for name, prints in entries.items()
            if isinstance(prints, list) and name not in ("", ".", "..", MANIFEST) and "/" not in name}


def _write_manifest(folder: Path, entries: dict[str, list]) -> None:
    write_atomic(folder / MANIFEST, json.dumps({"written_by": "lora-studio", "entries": entries}, indent=1) + "\n")


def _fingerprint(path: Path) -> list[int] | None:
    """A file's size and modification time; None for a folder (named only)."""
    st = path.lstat()
    return None if stat.S_ISDIR(st.st_mode) else [st.st_size, st.st_mtime_ns]


# ---- pieces ----------------------------------------------------------------------------------------------------

def write_failure(exc: BaseException | None) -> str | None:
    """The reason a write failed, in words, or None when `exc` is not a write failure (a bug keeps its trace)."""
    if isinstance(exc, OSError):
        return DISK_FULL if exc.errno == errno.ENOSPC else exc.strerror or first_line(exc)
    io_error = re.search(r"I/O error: (.+)", str(exc))  # safetensors reports OS errors inside its own type
    if type(exc).__name__ == "SafetensorError" and io_error:
        # e.g. "No space left on device (os error 28)"
        full = "No space left" in io_error.group(1) or io_error.group(1).endswith(f"(os error {errno.ENOSPC})")
        return DISK_FULL if full else re.sub(r" \(os error \d+\)$", "", io_error.group(1))
    if isinstance(exc, (RuntimeError, StudioError)):  # torch.save and our own wrappers keep the OSError as cause
        return write_failure(exc.__cause__ or exc.__context__)
    return None


def _cannot(target: Path, what: str | None, reason: OSError | str | None) -> str:
    if isinstance(reason, OSError):
        reason = write_failure(reason)
    return f"cannot write the {what} to {target}: {reason}" if what else f"cannot write {target}: {reason}"


def blocking_file(folder: str | Path) -> Path | None:
    """The file that stands where `folder` or one of its parents should be (nothing can be written under it), or
    None."""
    folder = Path(folder).expanduser()
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


def _refuse_blocked(folder: Path, target: Path, what: str | None) -> None:
    blocker = blocking_file(folder)
    if blocker is not None:
        raise WriteError(_cannot(target, what, f"{blocker} is a file, not a folder"))


def is_temp_name(name: str) -> bool:
    """Whether `name` is one of this module's temp names (`.NAME.partial-XXXXXXXX`): a write under way, or one a
    crash cut short."""
    return _PARTIAL.fullmatch(name) is not None


def temp_name(path: Path) -> Path:
    """A new temp name beside `path`: `.NAME.partial-XXXXXXXX`."""
    return path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")


def _keep_mode(existing: Path, new: Path) -> None:
    if existing.is_file():
        os.chmod(new, stat.S_IMODE(existing.stat().st_mode))


def _sync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (where the system can: not Windows, not every file system), to
    the disk."""
    folder = path.is_dir()
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if not folder:
            raise


def _sync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if not path.is_symlink():
            _sync(path)
    _sync(folder)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
