"""A run's checkpoints: what the training loop saves so that `resume` continues exactly, and reads back.

`checkpoints/step-N/` holds the adapter (PEFT format), the optimizer and scheduler states, the RNG states (Python,
NumPy, torch and, where there is one, CUDA) and trainer_state.json (the step, tokens seen, time spent and the last
losses: a `RunState`). The data position needs no record: the batches are a function of the seed and the step.
On resume, metrics.jsonl is cut back to the checkpoint's step so the curves continue without duplicates.

A run killed at any moment leaves its checkpoints usable: a checkpoint is written under a hidden staging name and
renamed into place complete, and one that goes (replaced, or pruned as too old) is first renamed to a hidden name
and only then deleted (a resume removes what a killed run left hidden). Only folders named exactly
`step-N` count as checkpoints (a person's `step-20 copy` is left alone).
"""

from __future__ import annotations

import json
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.core import run_layout
from studio.core.errors import TrainingError
from studio.core.files import write_atomic, write_failure
from studio.core.runconfig import RunConfig

TRAINER_STATE = "trainer_state.json"  # a checkpoint's RunState


@dataclass
class RunState:
    """Where a run stands; the training loop updates it every step and a checkpoint records it."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    last_loss: float | None = None
    last_val_loss: float | None = None
    last_score: float | None = None
    processes: int = 1  # the run's processes: each one's share of the data depends on their number


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's newest complete checkpoint folder (one with its trainer_state.json), or None."""
    complete = [path for path in run_layout.checkpoint_folders(run_dir) if (path / TRAINER_STATE).is_file()]
    return complete[-1] if complete else None


def save_checkpoint(run_dir: Path, model: Any, optimizer: Any, scheduler: Any, state: RunState,
                    keep: int, config: RunConfig) -> Path:
    """checkpoints/step-N/: adapter (PEFT format), optimizer, scheduler, RNG states, trainer_state.json.
    Written into a temporary folder and renamed, so a checkpoint folder is always complete. A write that fails
    (a full disk) leaves no staging folder behind and raises TrainingError; earlier checkpoints stay as they were."""
    import numpy as np
    import torch

    from studio.core.adapters.saving import save_adapter

    folder = run_dir / run_layout.CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / run_layout.checkpoint_name(state.step)
    staging = folder / f".{target.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        save_adapter(model, staging / run_layout.ADAPTER, base_model_spec=config.model.source)
        _save_torch(optimizer.state_dict(), staging / "optimizer.pt")
        _save_torch(scheduler.state_dict(), staging / "scheduler.pt")
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        _save_torch(rng, staging / "rng.pt")
        (staging / TRAINER_STATE).write_text(json.dumps({
            "step": state.step, "tokens_seen": state.tokens_seen, "elapsed_s": state.elapsed_s,
            "last_loss": state.last_loss, "last_val_loss": state.last_val_loss, "last_score": state.last_score,
            "processes": state.processes,
        }))
        if target.exists():
            _retire(target)
        staging.rename(target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        reason = write_failure(exc)
        if reason is None:
            raise
        raise TrainingError(f"cannot write the checkpoint of step {state.step} in {folder}: {reason}") from exc
    if keep > 0:
        for old in run_layout.checkpoint_folders(run_dir)[:-keep]:
            _retire(old)
    return target


def _save_torch(obj: Any, path: Path) -> None:
    """torch.save through a Python file, so that a failed write surfaces as the OSError it is (a full disk)."""
    import torch

    with path.open("wb") as handle:
        torch.save(obj, handle)


def _retire(checkpoint: Path) -> None:
    """Remove a checkpoint folder: renamed to a hidden name first (one atomic step), so a run killed while deleting
    never leaves a half-deleted `step-N` that looks complete."""
    retired = checkpoint.with_name(f".{checkpoint.name}.retired-{uuid.uuid4().hex[:8]}")
    checkpoint.rename(retired)
    shutil.rmtree(retired, ignore_errors=True)


def read_state(checkpoint: Path) -> RunState:
    data = json.loads((checkpoint / TRAINER_STATE).read_text())
    return RunState(step=int(data["step"]), tokens_seen=int(data["tokens_seen"]), elapsed_s=float(data["elapsed_s"]),
                    last_loss=data.get("last_loss"), last_val_loss=data.get("last_val_loss"),
                    last_score=data.get("last_score"), processes=int(data.get("processes", 1)))


def load_checkpoint(checkpoint: Path, model: Any, optimizer: Any, scheduler: Any, state: RunState) -> None:
    import numpy as np
    import torch
    from peft import set_peft_model_state_dict

    from studio.core.adapters.folder import read_adapter_tensors

    set_peft_model_state_dict(model, read_adapter_tensors(checkpoint / run_layout.ADAPTER))
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=False))
    rng = torch.load(checkpoint / "rng.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    loaded = read_state(checkpoint)
    for name in ("step", "tokens_seen", "elapsed_s", "last_loss", "last_val_loss", "last_score", "processes"):
        setattr(state, name, getattr(loaded, name))


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint so the curves continue without duplicates."""
    path = run_dir / run_layout.METRICS
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if record.get("step", 0) <= step and record.get("event") not in ("Finished", "Failed"):
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept))
