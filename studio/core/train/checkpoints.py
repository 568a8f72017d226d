"""A run's checkpoints: what the training loop saves so that `resume` continues exactly, and reads back.

`checkpoints/step-N/` holds the adapter (PEFT format), the optimizer and scheduler states, the RNG states (Python,
NumPy, torch and, where there is one, CUDA) and trainer_state.json (the step, tokens seen, time spent and the last
losses: a `RunState`). The data position needs no record: the batches are a function of the seed and the step.
On resume, metrics.jsonl is cut back to the checkpoint's step so the curves continue without duplicates.

A run killed at any moment leaves its checkpoints usable: a checkpoint is written under a hidden staging name and
renamed into place complete, and one that goes (replaced, or pruned as too old) is first renamed to a hidden name
and only then deleted (a resume removes what a killed run left hidden). Only folders named exactly
`step-N` count as checkpoints (a person's `step-20 copy` is left alone).

The .pt files hold tensors, numbers, strings and containers only (NumPy's RNG state as lists), so they are read
with `torch.load(weights_only=True)`: a checkpoint from elsewhere cannot run code when it is opened.
On resume, metrics.jsonl and spectra.jsonl are cut back to the checkpoint's step so the curves continue without
duplicates.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.core import run_layout
from studio.core.errors import StudioError, TrainingError, first_line
from studio.core.files import atomic_folder, temp_name, write_atomic, write_failure
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
    sharded: bool = False  # trained under FSDP: its optimizer state is keyed by parameter name, a DDP run's is not
    accelerate_config: str | None = None  # the accelerate config file of the person's own it was launched with


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's newest complete checkpoint folder (one with its trainer_state.json), or None."""
    complete = [path for path in run_layout.checkpoint_folders(run_dir) if (path / TRAINER_STATE).is_file()]
    return complete[-1] if complete else None


def save_checkpoint(run_dir: Path, model: Any, optimizer: Any, scheduler: Any, state: RunState,
                    keep: int, config: RunConfig, *, adapter_weights: dict[str, Any] | None = None,
                    optimizer_state: dict[str, Any] | None = None) -> Path:
    """checkpoints/step-N/: adapter (PEFT format), optimizer, scheduler, RNG states, trainer_state.json.
    Written atomically (files.atomic_folder), so a checkpoint folder is always complete. A write that fails (a
    full disk) raises TrainingError naming the step; earlier checkpoints stay as they were.

    `adapter_weights` and `optimizer_state`: whole tensors gathered from a model sharded across processes (FSDP,
    sharding.py), written instead of the model's and the optimizer's own slices."""

    from studio.core.adapters.saving import save_adapter

    folder = run_dir / run_layout.CHECKPOINTS
    target = folder / run_layout.checkpoint_name(state.step)
    # a step written again (a stop right after its checkpoint, a resume from an earlier one) is written whole under a
    # hidden name and then swapped in, never replaced entry by entry: a kill in between would leave a step-N that
    # looks complete but holds parts of two checkpoints, or none of its adapter
    written = temp_name(target) if target.exists() else target
    try:
        with atomic_folder(written, "checkpoint", owned=True) as staging:
            save_adapter(model, staging / run_layout.ADAPTER, base_model_spec=config.model.source,
                         state_dict=adapter_weights)
            _save_torch(optimizer.state_dict() if optimizer_state is None else optimizer_state,
                        staging / "optimizer.pt")
            _save_torch(scheduler.state_dict(), staging / "scheduler.pt")
            _save_torch(_rng_states(), staging / "rng.pt")
            (staging / TRAINER_STATE).write_text(json.dumps({
                "step": state.step, "tokens_seen": state.tokens_seen, "elapsed_s": state.elapsed_s,
                "last_loss": state.last_loss, "last_val_loss": state.last_val_loss, "last_score": state.last_score,
                "processes": state.processes, "sharded": state.sharded, "accelerate_config": state.accelerate_config,
            }))
        if written != target:
            _swap_in(written, target)
    except (OSError, StudioError, RuntimeError) as exc:
        if written != target:
            shutil.rmtree(written, ignore_errors=True)
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
    retired = _retired_name(checkpoint)
    checkpoint.rename(retired)
    shutil.rmtree(retired, ignore_errors=True)


def _swap_in(new: Path, checkpoint: Path) -> None:
    """Put the complete checkpoint `new` where `checkpoint` is: the old one renamed aside, the new one renamed in, the
    old one deleted. A kill between the two renames leaves the earlier checkpoints, which a resume continues from."""
    retired = _retired_name(checkpoint)
    checkpoint.rename(retired)
    try:
        new.rename(checkpoint)
    except OSError:
        retired.rename(checkpoint)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _retired_name(checkpoint: Path) -> Path:
    return checkpoint.with_name(f".{checkpoint.name}.retired-{uuid.uuid4().hex[:8]}")


def set_aside(checkpoint: Path) -> Path:
    """Rename a checkpoint no run can continue from (its weights made the loss NaN) to `diverged-step-N`: out of
    `latest_checkpoint`'s sight, kept for a look."""
    aside = checkpoint.with_name(f"diverged-{checkpoint.name}")
    if aside.exists():
        shutil.rmtree(aside)
    checkpoint.rename(aside)
    return aside


def read_state(checkpoint: Path) -> RunState:
    path = checkpoint / TRAINER_STATE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return RunState(step=int(data["step"]), tokens_seen=int(data["tokens_seen"]),
                        elapsed_s=float(data["elapsed_s"]), last_loss=data.get("last_loss"),
                        last_val_loss=data.get("last_val_loss"), last_score=data.get("last_score"),
                        processes=int(data.get("processes", 1)), sharded=bool(data.get("sharded", False)),
                        accelerate_config=data.get("accelerate_config"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainingError(f"cannot read the checkpoint's {path}: {first_line(exc)}") from exc


def load_adapter_weights(checkpoint: Path, model: Any) -> None:
    """Put the checkpoint's adapter weights into the PeftModel `model`, before accelerate prepares it (a model
    sharded later keeps its slice of them)."""
    from peft import set_peft_model_state_dict

    from studio.core.adapters.folder import read_adapter_tensors

    set_peft_model_state_dict(model, read_adapter_tensors(checkpoint / run_layout.ADAPTER))


def load_checkpoint(checkpoint: Path, model: Any, optimizer: Any, scheduler: Any, state: RunState) -> None:
    """Put the checkpoint's optimizer and scheduler state, RNG states and RunState in place (the adapter weights:
    `load_adapter_weights`). `model` is the model as prepared, which an optimizer state keyed by parameter names
    (a sharded run's) is matched against.

    The optimizer's settings (learning rate, weight decay, ...) stay those of the run as configured now, so a
    resume may change them (a lower learning rate after the loss became NaN); with the settings unchanged the
    numbers are exactly the checkpoint's and the run continues as if it had not stopped."""
    import numpy as np
    import torch

    from studio.core.train import sharding

    optimizer_state = load_tensors(checkpoint / "optimizer.pt")
    scheduler_state = load_tensors(checkpoint / "scheduler.pt")
    rng = load_tensors(checkpoint / "rng.pt")
    loaded = read_state(checkpoint)
    schedule = getattr(scheduler, "scheduler", scheduler)  # the LambdaLR inside accelerate's wrapper
    settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    base_lrs = list(schedule.base_lrs)
    if sharding.is_keyed_by_name(optimizer_state):
        sharding.load_optimizer_state(model, optimizer, optimizer_state)
    else:
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    schedule.base_lrs = base_lrs
    for group, own, base_lr, factor in zip(optimizer.param_groups, settings, base_lrs, schedule.lr_lambdas):
        group.update(own)
        group["lr"] = base_lr * factor(schedule.last_epoch)  # as the scheduler computes it
    random.setstate(rng["python"])
    numpy_state = rng["numpy"]
    np.random.set_state((numpy_state[0], np.asarray(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    for name in ("step", "tokens_seen", "elapsed_s", "last_loss", "last_val_loss", "last_score", "processes",
                 "sharded", "accelerate_config"):
        setattr(state, name, getattr(loaded, name))


def load_tensors(path: Path) -> Any:
    """A checkpoint's .pt file, read with `torch.load(weights_only=True)`: tensors, numbers, strings, containers
    (and NumPy arrays, as checkpoints of earlier versions hold). A pickle asking for anything else, which could
    run code, is refused without running it."""
    import numpy as np
    import torch
    from numpy._core.multiarray import _reconstruct

    numpy_arrays = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct]  # rebuilt as plain arrays
    try:
        with torch.serialization.safe_globals(numpy_arrays):
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):
            raise TrainingError(f"{path} holds more than tensors and numbers (a pickle that could run code when "
                                "read): the studio does not open it; resume from a checkpoint the studio "
                                "wrote") from exc
        raise TrainingError(f"cannot read the checkpoint's {path}: it is damaged or not a checkpoint file") from exc
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise TrainingError(f"cannot read the checkpoint's {path}: {first_line(exc)}") from exc


def _rng_states() -> dict[str, Any]:
    """Python's, NumPy's (as lists), torch's and CUDA's random states: what `load_tensors` reads back."""
    import numpy as np
    import torch

    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    rng: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state(),
                           "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)]}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def trim_history(run_dir: Path, step: int) -> None:
    """On resume, drop the records of metrics.jsonl and spectra.jsonl written after the checkpoint's step (and
    the run's end records), so the curves continue without duplicates. Each file is rewritten atomically."""
    for name in (run_layout.METRICS, run_layout.SPECTRA):
        path = run_dir / name
        if not path.is_file():
            continue
        kept = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if record.get("step", 0) <= step and record.get("event") not in ("Finished", "Failed"):
                kept.append(line)
        write_atomic(path, "".join(line + "\n" for line in kept))
