"""The optimizer side of a training run: AdamW (plain or 8-bit), its learning-rate schedule (warmup, then cosine,
linear or constant) and the gradient norm, clipped or only measured. `t` is the run's TrainingConfig."""

from __future__ import annotations

from typing import Any

from studio.core.errors import TrainingError

# the run file's schedule names -> transformers' scheduler names
_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def build_optimizer(params: list[Any], t: Any, device: str) -> Any:
    import torch

    if t.optimizer == "adamw-8bit":
        if not device.startswith("cuda"):
            raise TrainingError("8-bit AdamW needs a CUDA GPU (bitsandbytes): use optimizer adamw on this machine")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    # the fused step (one kernel over all tensors) exists for CUDA and the CPU; elsewhere torch's default
    return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay,
                             fused=device.startswith(("cuda", "cpu")) or None)


def build_scheduler(optimizer: Any, t: Any) -> Any:
    from transformers import get_scheduler

    warmup = int(round(t.warmup_ratio * t.max_steps))
    return get_scheduler(_SCHEDULES[t.schedule], optimizer, num_warmup_steps=warmup, num_training_steps=t.max_steps)


def clip_gradients(accelerator: Any, params: list[Any], max_norm: float) -> Any:
    """The gradient norm before clipping, as a tensor on the device (read with the step's one sync). Under FSDP the
    gradients are slices (DTensors) and so is their norm until made whole, which sums the slices' squares."""
    import torch

    if max_norm > 0:
        norm = accelerator.clip_grad_norm_(params, max_norm)
    else:
        grads = [p.grad.detach() for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=accelerator.device)
        if not hasattr(grads[0], "full_tensor"):
            return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        norm = torch.nn.utils.get_total_norm(grads)  # torch 2.6+, as FSDP2 is
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return torch.as_tensor(norm, device=accelerator.device)


def _torch_optimizer(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # under accelerate's AcceleratedOptimizer


def skips_on_device(optimizer: Any) -> bool:
    """Whether the optimizer can skip a step on the device when told so by a tensor (`skip_from_now_if`), as torch's
    fused Adam and AdamW do for GradScaler (`found_inf`), so that the host need not read the loss before stepping."""
    import torch

    inner = _torch_optimizer(optimizer)
    return isinstance(inner, torch.optim.Adam | torch.optim.AdamW) and bool(inner.defaults.get("fused"))


def skip_from_now_if(optimizer: Any, condition: Any) -> None:
    """The next step and every later one are skipped on the device once `condition` (a 0-dim bool tensor) holds."""
    import torch

    inner = _torch_optimizer(optimizer)
    before = getattr(inner, "found_inf", None)
    inner.found_inf = condition.float() if before is None else torch.maximum(before, condition.float())
