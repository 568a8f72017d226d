"""The causal-LM loss without the full logits: chunked linear cross-entropy.

A *ForCausalLM computes `lm_head(hidden)` at every position (batch × seq × vocab: 8 × 1024 × 128k is 2 GiB in bf16,
4 GiB once upcast to fp32, as much again for its gradient) and then HF's ForCausalLMLoss: logits in fp32, labels
shifted by one, cross-entropy summed over the counted tokens and divided by `num_items_in_batch`. Here the decoder
runs as usual, but the head and the loss run over chunks of the counted positions only: each chunk's logits give
its share of the loss and, at once, d(hidden) = (softmax − onehot) / num_items · W, so nothing of vocabulary width
outlives its chunk and backward is a multiply. The precisions follow HF's path: logits in the autocast dtype,
softmax in fp32, the logits' gradient cast back to the autocast dtype before its product with W.

The head must be a frozen plain `nn.Linear` that the model applies unchanged (no softcapping, no logit scaling, no
auxiliary loss): `blocker()` says why a model does not qualify, and the engine keeps the model's own loss then.
The training loop's step goes through here either way: `to_device` moves a batch (turning its labels into counted
positions for the chunked loss) and `step_loss` takes the chunked loss or the model's own.
Imported only where torch already is (the training loop), so torch is imported at the top.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**27  # logits per chunk: 1,046 rows of a 128k vocabulary, 256 MiB in bf16

# config fields of models whose logits are not the plain product (Gemma's final_logit_softcapping, Cohere's
# logit_scale, Granite's logits_scaling, Falcon-H1's lm_head_multiplier, ...) or whose loss adds a router term
_LOGIT_CHANGERS = re.compile(r"softcap|logits?_scal|multiplier|output_router_logits")


def blocker(model: Any) -> str | None:
    """Why the chunked loss cannot stand in for this model's own (None when it can). `model`: a *ForCausalLM or a
    PeftModel around one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not type(base).__module__.startswith("transformers.models."):
        return f"{type(base).__name__} is not a transformers model (its head may do more than a product)"
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if getattr(base, "base_model", base) is base or head is None:
        return f"{type(base).__name__} has no separate decoder and output head"
    if type(head) is not torch.nn.Linear:
        return "the output head is adapted or saved with the adapter"
    if head.weight.requires_grad or head.bias is not None:
        return "the output head is trained or has a bias"
    for config in filter(None, (base.config, getattr(base.config, "text_config", None))):
        for name, value in config.to_dict().items():
            if _LOGIT_CHANGERS.search(name) and value not in (None, False, 0, 1):
                return f"the model changes its logits or loss ({name}={value})"
    return None


def select_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat positions (row × width + column) whose next token counts, and those tokens: HF's shift by one.
    Call it on the CPU copy of the labels, where the data-dependent size costs no GPU sync."""
    following = labels[:, 1:]
    row, column = (following != IGNORE_INDEX).nonzero(as_tuple=True)
    return row * labels.shape[1] + column, following[row, column]


def causal_lm_loss(model: Any, inputs: dict[str, torch.Tensor], positions: torch.Tensor, targets: torch.Tensor,
                   num_items: int, *, compiled: bool = False) -> torch.Tensor:
    """What `model(**inputs, labels=labels, num_items_in_batch=num_items).loss` gives, from the decoder's hidden
    states and chunks of the head. `positions`, `targets`: `select_targets(labels)` on the model's device.
    `inputs`: input_ids, and attention_mask or position_ids. `compiled`: fuse each chunk's softmax (CUDA)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # use_cache=False: with a cache, transformers ignores packed position_ids and lets packed examples attend
    hidden = base.base_model(**inputs, use_cache=False)[0]
    counted = hidden.flatten(0, 1).index_select(0, positions)
    softmax_grad = _compiled_softmax_grad() if compiled else _softmax_grad
    return LinearCrossEntropy.apply(counted, base.get_output_embeddings().weight, targets, num_items, softmax_grad)


def matches_model(model: Any, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
                  autocast: Callable[[], AbstractContextManager] = nullcontext, tolerance: float = 2e-3) -> bool:
    """Whether the chunked loss equals the model's own on this batch (evaluation mode: no dropout, no RNG drawn).
    A guard for architectures whose head does more than `blocker` can see. The tolerance is relative: the two paths
    round differently in bf16 (the model's head keeps its logits in bf16 before the float32 loss, ours rounds each
    chunk's product), a few 1e-4 on a mean loss; a head that scales, caps or biases its logits differs by far more."""
    positions, targets = select_targets(labels.cpu())
    if not len(targets):
        return True
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast():
            own = float(model(**inputs, labels=labels, use_cache=False, num_items_in_batch=len(targets)).loss)
            ours = float(causal_lm_loss(model, inputs, positions.to(labels.device), targets.to(labels.device),
                                        len(targets)))
    finally:
        model.train(was_training)
    return abs(own - ours) <= tolerance * max(1.0, abs(own))


class ChunkedLoss(torch.nn.Module):
    """The model with `causal_lm_loss` as its forward: what the engine trains (and accelerate prepares) when the loss
    is chunked, so that the forward of a DistributedDataParallel around it, which arms the gradients' all-reduce for
    the backward that follows, runs the chunked loss too."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: dict[str, torch.Tensor], positions: torch.Tensor, targets: torch.Tensor,
                num_items: float, compiled: bool) -> torch.Tensor:
        return causal_lm_loss(self.model, inputs, positions, targets, num_items, compiled=compiled)


def step_loss(model: Any, batch: dict[str, Any], label_tokens: float, micro: int, is_lm: bool, *,
              compiled: bool) -> Any:
    """Token-weighted mean over the whole optimizer step (all micro-batches), as one big batch would give. `model`:
    a ChunkedLoss (or a wrapper around one) for the chunked loss, else the model."""
    if "targets" in batch:  # the chunked loss (`to_device` turned the labels into counted positions)
        inputs = {k: v for k, v in batch.items() if k not in ("positions", "targets")}
        return model(inputs, batch["positions"], batch["targets"], max(1, label_tokens), compiled)
    # use_cache=False: with a cache, transformers ignores packed position_ids and lets packed examples attend
    if is_lm:
        return model(**batch, use_cache=False, num_items_in_batch=max(1, label_tokens)).loss
    return model(**batch).loss / micro


def to_device(batch: dict[str, Any], device: Any, fused: bool, attention: str = "sdpa") -> dict[str, Any]:
    """On CUDA through pinned memory, so the copy does not wait for the GPU. A language-modelling batch loses its
    mask when its padding is all on the right, where causal attention never looks: transformers would otherwise
    build a dense mask (SDPA then cannot take its flash kernel), or sum it on the GPU (a sync) only to drop it. For
    the chunked loss the labels become the counted positions and their tokens (found here, on the CPU); for varlen
    attention the batch gains its sequences' cumulative lengths (attention.to_kwargs)."""
    from studio.core.train import attention as attention_

    batch = dict(batch)
    mask = batch.get("attention_mask")
    if mask is not None and batch["labels"].dim() == 2 and bool((mask[:, 1:] <= mask[:, :-1]).all()):
        del batch["attention_mask"]
    if attention == attention_.CAUSAL and "attention_mask" in batch:  # transformers would not build it
        raise RuntimeError("sdpa_causal trains batches without a mask only")
    if attention == attention_.VARLEN:
        rows, width = batch["input_ids"].shape
        positions = batch.get("position_ids", torch.arange(width).expand(rows, width))
        batch.update(attention_.to_kwargs(positions))
    if fused:
        batch["positions"], batch["targets"] = select_targets(batch.pop("labels"))
    if device.type != "cuda":
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    else:
        moved = {k: v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items()}
    if "cu_seq_lens_q" in moved:  # one tensor for both; its length (the batch's sequences) varies from batch to batch
        moved["cu_seq_lens_k"] = moved["cu_seq_lens_q"]
        torch._dynamo.maybe_mark_dynamic(moved["cu_seq_lens_q"], 0)
    return moved


def _softmax_grad(logits: torch.Tensor, targets: torch.Tensor,
                  scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's summed token losses and d(loss)/d(logits) in the logits' dtype, as HF's fp32 cross-entropy gives
    them. `scale`: 1/num_items as a 0-dim tensor, so the compiled version takes a new value without recompiling."""
    upcast = logits.float()
    counted = targets != IGNORE_INDEX
    safe = torch.where(counted, targets, 0).unsqueeze(1)
    log_norm = torch.logsumexp(upcast, dim=-1, keepdim=True)
    loss_sum = torch.where(counted, (log_norm - upcast.gather(1, safe)).squeeze(1), 0.0).sum()
    grad = upcast.sub_(log_norm).exp_()  # the softmax, in place: the logits are not needed again
    grad.scatter_add_(1, safe, -counted.unsqueeze(1).to(grad.dtype))  # minus the one-hot target
    return loss_sum, grad.mul_(counted.unsqueeze(1) * scale).to(logits.dtype)


_compiled: list[Callable] = []  # built on first use: compiling costs seconds


def _compiled_softmax_grad() -> Callable:
    if not _compiled:
        _compiled.append(torch.compile(_softmax_grad))
    return _compiled[0]


class LinearCrossEntropy(torch.autograd.Function):
    """Σ CE(hidden · Wᵀ, targets) / num_items over rows of `hidden`, in chunks; W gets no gradient, and hidden's is
    computed in forward (it needs the chunk's logits, which are gone by backward)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, num_items: int,
                softmax_grad: Callable) -> torch.Tensor:
        rows = hidden.shape[0]
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        scale = torch.full((), 1.0 / max(1, num_items), dtype=torch.float32, device=hidden.device)
        chunks = max(1, -(-rows // max(1, CHUNK_ELEMENTS // weight.shape[0])))
        size = max(1, -(-rows // chunks))  # chunks of (nearly) equal size
        for start in range(0, rows, size):
            logits = hidden[start:start + size] @ weight.t()  # in the autocast dtype, as lm_head gives it
            if softmax_grad is not _softmax_grad:
                torch._dynamo.maybe_mark_dynamic(logits, 0)
            loss_sum, grad_logits = softmax_grad(logits, targets[start:start + size], scale)
            total += loss_sum
            if grad_hidden is not None:
                grad_hidden[start:start + size] = grad_logits @ weight
        ctx.save_for_backward(grad_hidden)
        return total / max(1, num_items)

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None, None
