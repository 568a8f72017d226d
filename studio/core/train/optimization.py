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
    """The gradient norm before clipping, as a tensor on the device (read with the step's one sync)."""
    import torch

    if max_norm > 0:
        return torch.as_tensor(accelerator.clip_grad_norm_(params, max_norm), device=accelerator.device)
    grads = [p.grad.detach().norm() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros((), device=accelerator.device)
