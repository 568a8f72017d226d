"""Where the studio's shipped files (demo dataset, icons) are.

A source checkout, an editable install and a PyInstaller bundle all keep `resources/` beside the `studio` package
(the bundle's spec copies it there). A wheel install has no such folder: pyproject.toml's data-files put the same
files under `<data>/share/lora-studio`, where `<data>` is the install scheme's data path (the venv or the prefix for
a plain install, the user base for `pip install --user`).
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path
from typing import Iterable

APP_NAME = "lora-studio"
MARKER = Path("demo") / "train.jsonl"  # a root counts only when it holds the demo dataset


def installed_root() -> Path:
    """Where a plain `pip install` of the wheel puts the shipped files for this interpreter."""
    return Path(sysconfig.get_path("data")) / "share" / APP_NAME


def candidate_roots() -> tuple[Path, ...]:
    """Places the shipped files may be, in the order they are tried: the source tree first, so that a checkout uses
    its own files even when an older wheel left copies in the environment."""
    source = Path(__file__).resolve().parents[2] / "resources"
    others = (
        Path(sys.prefix) / "share" / APP_NAME,  # a distribution's packages install under the prefix
        Path(sysconfig.get_path("data", sysconfig.get_preferred_scheme("user"))) / "share" / APP_NAME,
    )
    return tuple(dict.fromkeys((source, installed_root(), *others)))


def resources_root(candidates: Iterable[Path] | None = None) -> Path:
    """The first of `candidates` (default: `candidate_roots()`) that holds the shipped files. When none does,
    `installed_root()`, so that a missing file is reported where the wheel should have put it."""
    roots = tuple(candidates) if candidates is not None else candidate_roots()
    return next((root for root in roots if (root / MARKER).is_file()), installed_root())


def app_icon_path() -> Path:
    """The scalable application icon (a 256 px PNG of it lies beside it)."""
    return resources_root() / "icons" / f"{APP_NAME}.svg"
