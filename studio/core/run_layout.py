"""Where things lie in a run folder, written down once. The engine writes these names; the runs list, resume,
export and the CLI read them.

    run.yaml               the run file
    metrics.jsonl          one event record a line
    spectra.jsonl          the spectrum snapshots (large, so apart from the metrics)
    adapter/               the final adapter, PEFT format
    tokenizer/             the tokenizer the run trained with
    checkpoints/step-N/    a checkpoint after optimizer step N
    error.log              the traceback of a bug a run ended on (error-R.log: process R's, on several processes)
"""

from __future__ import annotations

import re
from pathlib import Path

RUN_FILE = "run.yaml"
METRICS = "metrics.jsonl"
SPECTRA = "spectra.jsonl"
ADAPTER = "adapter"
TOKENIZER = "tokenizer"
CHECKPOINTS = "checkpoints"
ERROR_LOG = "error.log"  # a bug's traceback, when a run ended on one

_CHECKPOINT_NAME = re.compile(r"step-(\d+)")


def is_run_folder(folder: str | Path) -> bool:
    return (Path(folder) / RUN_FILE).is_file()


def checkpoint_name(step: int) -> str:
    return f"step-{step}"


def checkpoint_step(folder: str | Path) -> int | None:
    """N of a `step-N` checkpoint folder; None for any other name (`step-20 copy`, `step-x`, a staging folder)."""
    match = _CHECKPOINT_NAME.fullmatch(Path(folder).name)
    return int(match.group(1)) if match else None


def checkpoint_folders(run_dir: str | Path) -> list[Path]:
    """The run's checkpoint folders, oldest step first; folders with other names are not checkpoints."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(step, path) for path in folder.iterdir() if path.is_dir() and (step := checkpoint_step(path)) is not None]
    return [path for _, path in sorted(found)]
