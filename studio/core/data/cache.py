"""Prepared datasets on disk, so that a re-run, a resume or the window's next look at the same data skips reading
and tokenizing. An entry is one .npz file (numpy arrays and a JSON header, no pickles) named by a key that digests
everything the result depends on: the data files' bytes (or a hub dataset's prepared files), the tokenizer (its
whole definition and chat template), the data settings and this package's own source, so that a change to any of
them misses. Entries are written atomically under the studio's cache folder ($LORA_STUDIO_DATA_CACHE, else
<studio cache>/data); the least recently used go once there are more than MAX_ENTRIES or they hold more than
MAX_BYTES together (the newest always stays). The window prepares the data again as its settings change, so a run
started from it usually finds its data here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from studio.core.errors import WriteError
from studio.core.files import atomic_file, cache_root

log = logging.getLogger(__name__)
MAX_ENTRIES = 16
MAX_BYTES = 8 * 2**30
HEADER = "header"  # the array holding the JSON header


def cache_dir() -> Path:
    return Path(os.environ.get("LORA_STUDIO_DATA_CACHE") or cache_root() / "data")


def cache_key(parts: Mapping[str, Any]) -> str:
    """A digest of `parts` (JSON-able) and of the data package's code."""
    text = json.dumps({"parts": parts, "code": _code_digest()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What identifies a tokenizer's output: its backend's full definition, chat template and special ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else repr(tokenizer)
    extra = [type(tokenizer).__name__, getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id,
             getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "truncation_side", None)]
    return hashlib.sha256((definition + json.dumps(extra, default=str)).encode()).hexdigest()


def read(key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The arrays and header stored under `key`, or None when there is no (readable) entry."""
    path = cache_dir() / f"{key}.npz"
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        os.utime(path)  # recently used
    except (OSError, ValueError, KeyError):  # absent, or cut short by a crash of another writer
        return None
    header = json.loads(arrays.pop(HEADER).tobytes().decode())
    return arrays, header


def write(key: str, arrays: Mapping[str, np.ndarray], header: Mapping[str, Any]) -> Path | None:
    """Store an entry (atomically); returns its path, or None when the cache folder cannot be written (the data is
    still prepared, only not kept)."""
    folder = cache_dir()
    path = folder / f"{key}.npz"
    payload = dict(arrays)
    payload[HEADER] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    try:
        with atomic_file(path) as temp, temp.open("wb") as handle:
            np.savez(handle, **payload)
        _prune(folder)
    except (OSError, WriteError) as exc:
        log.warning("cannot cache the prepared data in %s: %s", folder, getattr(exc, "strerror", None) or exc)
        return None
    return path


def _prune(folder: Path) -> None:
    entries = sorted(((p.stat().st_mtime, p.stat().st_size, p) for p in folder.glob("*.npz")), reverse=True)
    kept_bytes = 0
    for n, (_, size, path) in enumerate(entries):
        kept_bytes += size
        if n and (n >= MAX_ENTRIES or kept_bytes > MAX_BYTES):
            path.unlink(missing_ok=True)


@lru_cache(maxsize=1)
def _code_digest() -> str:
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()
