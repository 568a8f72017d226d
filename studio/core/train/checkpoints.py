"""A run's checkpoints: what the training loop saves so that `resume` continues exactly, and reads back.

`checkpoints/step-N/` holds the adapter (PEFT format), the optimizer and scheduler states, the RNG states (Python,
NumPy, torch and, where there is one, CUDA) and trainer_state.json (the step, tokens seen, time spent and the last
losses: a `RunState`). The data position needs no record: the batches are a function of the seed and the step.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.core.errors import TrainingError, first_line
from studio.core.files import atomic_folder, write_atomic
from studio.core.runconfig import RunConfig


@dataclass
class RunState:
    """Where a run stands; the training loop updates it every step and a checkpoint records it."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    last_loss: float | None = None
    last_val_loss: float | None = None
    last_score: float | None = None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's newest complete checkpoint folder (one with its trainer_state.json), or None."""
    folder = Path(run_dir) / "checkpoints"
    steps = sorted(
        (int(p.name.split("-", 1)[1]), p) for p in folder.glob("step-*") if (p / "trainer_state.json").is_file()
    ) if folder.is_dir() else []
    return steps[-1][1] if steps else None


def save_checkpoint(run_dir: Path, model: Any, optimizer: Any, scheduler: Any, state: RunState,
                    keep: int, config: RunConfig) -> Path:
    """checkpoints/step-N/: adapter (PEFT format), optimizer, scheduler, RNG states, trainer_state.json.
    Written atomically (files.atomic_folder), so a checkpoint folder is always complete."""
    import torch

    from studio.core.adapters.saving import save_adapter

    folder = run_dir / "checkpoints"
    target = folder / f"step-{state.step}"
    with atomic_folder(target, "checkpoint", owned=True) as staging:
        save_adapter(model, staging / "adapter", base_model_spec=config.model.source)
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        torch.save(_rng_states(), staging / "rng.pt")
        (staging / "trainer_state.json").write_text(json.dumps({
            "step": state.step, "tokens_seen": state.tokens_seen, "elapsed_s": state.elapsed_s,
            "last_loss": state.last_loss, "last_val_loss": state.last_val_loss, "last_score": state.last_score,
        }))
    if keep > 0:
        steps = sorted((int(p.name.split("-", 1)[1]), p) for p in folder.glob("step-*"))
        for _, old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def set_aside(checkpoint: Path) -> Path:
    """Rename a checkpoint no run can continue from (its weights made the loss NaN) to `diverged-step-N`: out of
    `latest_checkpoint`'s sight, kept for a look."""
    aside = checkpoint.with_name(f"diverged-{checkpoint.name}")
    if aside.exists():
        shutil.rmtree(aside)
    checkpoint.rename(aside)
    return aside


def read_state(checkpoint: Path) -> RunState:
    path = checkpoint / "trainer_state.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return RunState(step=int(data["step"]), tokens_seen=int(data["tokens_seen"]),
                        elapsed_s=float(data["elapsed_s"]), last_loss=data.get("last_loss"),
                        last_val_loss=data.get("last_val_loss"), last_score=data.get("last_score"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainingError(f"cannot read the checkpoint's {path}: {first_line(exc)}") from exc


def load_checkpoint(checkpoint: Path, model: Any, optimizer: Any, scheduler: Any, state: RunState) -> None:
    """Put the checkpoint's adapter weights, optimizer and scheduler state, RNG states and RunState in place.

    The optimizer's settings (learning rate, weight decay, ...) stay those of the run as configured now, so a
    resume may change them (a lower learning rate after the loss became NaN); with the settings unchanged the
    numbers are exactly the checkpoint's and the run continues as if it had not stopped."""
    import numpy as np
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    optimizer_state = load_tensors(checkpoint / "optimizer.pt")
    scheduler_state = load_tensors(checkpoint / "scheduler.pt")
    rng = load_tensors(checkpoint / "rng.pt")
    loaded = read_state(checkpoint)
    weights = load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))
    schedule = getattr(scheduler, "scheduler", scheduler)  # the LambdaLR inside accelerate's wrapper
    settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    base_lrs = list(schedule.base_lrs)
    set_peft_model_state_dict(model, weights)
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
    for name in ("step", "tokens_seen", "elapsed_s", "last_loss", "last_val_loss", "last_score"):
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
                                "read): the studio does not open it; resume from a checkpoint the studio wrote") from exc
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
    for name in ("metrics.jsonl", "spectra.jsonl"):
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
