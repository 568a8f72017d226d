"""Attention for packed rows without a dense mask: which implementation a run's training steps use.

A packed row (data.packing) holds several examples, its position ids restarting at 0 at each one. Under SDPA,
transformers turns those restarts into a dense block-diagonal mask (b × 1 × s × s, after a host sync), and SDPA
with a mask cannot take its flash kernel. On a CUDA GPU `attention: auto` trains packed batches with, in order:
- varlen: torch's flash kernel for variable-length sequences (torch.nn.attention.varlen), fed the examples'
  cumulative lengths, which `to_kwargs` finds on the CPU with the batch: no mask, nothing across examples computed;
- flex_attention: transformers' FlexAttention, whose document mask (a BlockMask from the same position ids) lets
  it skip the blocks between examples; where torch has no varlen kernel;
- sdpa: transformers' default, and what the CPU uses.
The engine checks its pick before the first step against SDPA on one packed row (the loss, and that backward runs);
one that fails or disagrees gives way to the next, with a warning. Evaluation and generation run on SDPA.

Batches without packing need no mask either: their padding is on the right, where causal attention never looks, so
the engine leaves the mask out (losses.to_device) and SDPA takes its flash kernel. Given no mask, transformers still
looks for packed examples in the position ids it made itself, on the GPU, and reads the answer back: a host sync in
every forward, which drains the queue of work the host had put ahead. On a CUDA GPU `auto` therefore trains
unpacked batches with sdpa_causal: transformers' SDPA function registered under a name of its own, for which
transformers builds no mask and looks for nothing (as for varlen); SDPA then runs causal, as it did.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

SDPA, FLEX, VARLEN = "sdpa", "flex_attention", "varlen"
CAUSAL = "sdpa_causal"  # not a setting: what `auto` picks for unpacked batches on a GPU
CHOICES = ("auto", SDPA, FLEX, VARLEN)
# the names these functions are registered under in transformers' AttentionInterface (not its mask interface)
VARLEN_NAME, CAUSAL_NAME = "studio_varlen", "studio_sdpa_causal"


def varlen_kernel() -> Callable | None:
    """torch's variable-length flash attention as kernel(q, k, v, cu_seqlens, max_length, scale), causal, for
    (tokens, heads, head_dim) inputs; None where this torch has none. Its keywords changed between releases (causal
    as `is_causal` or as a window; grouped-query heads as `enable_gqa` or not at all), so they are read here."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    accepts = inspect.signature(varlen_attn).parameters

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_length: int,
               scale: float | None) -> torch.Tensor:
        extra: dict[str, Any] = {"is_causal": True} if "is_causal" in accepts else {"window_size": (-1, 0)}
        if scale is not None and "scale" in accepts:
            extra["scale"] = scale
        elif scale is not None and not math.isclose(scale, q.shape[-1] ** -0.5):
            raise RuntimeError("this torch's varlen attention takes no scale, and this model's is not 1/sqrt(d)")
        if k.shape[1] != q.shape[1]:  # grouped-query attention
            if "enable_gqa" in accepts:
                extra["enable_gqa"] = True
            else:
                k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_length, max_length, **extra)

    return kernel


def varlen_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface over `varlen_kernel`: query (b, heads, s, d), key and value
    (b, kv heads, s, d); the batch's rows laid end to end, each example (and each padding run) a sequence of its
    own. Returns (b, s, heads, d) as transformers' other implementations do."""
    if cu_seq_lens_q is None or max_length_q is None:
        raise RuntimeError("varlen attention needs the batch's cu_seq_lens_q (attention.to_kwargs)")
    # what this plain causal kernel does not do: the engine's check then falls back to FlexAttention or SDPA
    window = kwargs.get("sliding_window")
    if dropout or kwargs.get("softcap") or kwargs.get("s_aux") is not None or (window and window < max_length_q):
        raise RuntimeError("varlen attention covers plain causal attention only (no dropout, softcapping, sinks or "
                           "sliding window shorter than the rows)")
    batch, heads, width, dim = query.shape
    q, k, v = (t.transpose(1, 2).reshape(batch * width, t.shape[1], dim) for t in (query, key, value))
    out = _KERNEL[0](q, k, v, cu_seq_lens_q, max_length_q, scaling)
    return out.view(batch, width, heads, dim), None


_KERNEL: list[Callable] = []  # the kernel varlen_attention calls, set by register_varlen
_SDPA: list[Callable] = []  # transformers' SDPA function, which causal_attention calls (set with its registration)


def causal_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA function on rows that need no mask: causal, with nothing to hide (unpacked rows whose
    padding is on the right). Under this name transformers builds no mask, so one that needs it is refused here."""
    if attention_mask is not None or kwargs.get("sliding_window"):
        raise RuntimeError("sdpa_causal covers plain causal attention on unmasked rows only (no sliding window)")
    return _SDPA[0](module, query, key, value, None, **kwargs)


def to_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """The varlen kernel's view of a batch (on the CPU, with the batch): the cumulative lengths of its sequences
    when its rows are laid end to end (a sequence starts at each row and wherever the position ids do not go up by
    one: at each packed example, and at the padding, whose positions restart too) and the row width, which bounds
    every sequence's length (the same value for every batch of that width: a compiled layer keeps its graph)."""
    rows, width = position_ids.shape
    flat = position_ids.reshape(-1)
    starts = torch.ones(rows * width, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1] + 1
    starts[::width] = True
    cu = torch.cat([starts.nonzero().flatten(), torch.tensor([rows * width])]).to(torch.int32)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": width, "max_length_k": width}


def available(name: str, *, is_cuda: bool) -> str | None:
    """Why `name` cannot train here (None when it can)."""
    if name == SDPA:
        return None
    if not is_cuda:
        return "it needs a CUDA GPU"
    if name == VARLEN and varlen_kernel() is None:
        return "this torch has no torch.nn.attention.varlen"
    if name == FLEX and importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return "this torch has no FlexAttention"
    return None


def candidates(setting: str, *, is_cuda: bool, packed: bool) -> list[str]:
    """The implementations to try, best first, ending with SDPA. `auto` tries the fast ones on a GPU only: for
    packed batches the kernels without a dense mask; without packing, SDPA without transformers' mask check."""
    if setting == "auto" and is_cuda and not packed:
        return [CAUSAL, SDPA]
    if setting == SDPA or (setting == "auto" and not is_cuda):
        return [SDPA]
    wanted = [VARLEN, FLEX] if setting == "auto" else [setting]
    return [name for name in wanted if available(name, is_cuda=is_cuda) is None] + [SDPA]


def register_varlen(kernel: Callable | None = None) -> None:
    """Register `varlen_attention` with transformers (as VARLEN_NAME) over `kernel`, a function of
    (q, k, v, cu_seqlens, max_length, scale) as `varlen_kernel` gives: torch's by default."""
    from transformers import AttentionInterface

    kernel = kernel or varlen_kernel()
    if kernel is None:
        raise RuntimeError("this torch has no torch.nn.attention.varlen")
    _KERNEL[:] = [kernel]
    AttentionInterface.register(VARLEN_NAME, varlen_attention)


def transformers_name(name: str) -> str:
    """What `model.set_attn_implementation` takes for `name` (the studio's functions registered first)."""
    if name == CAUSAL:
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        _SDPA[:] = [ALL_ATTENTION_FUNCTIONS[SDPA]]
        AttentionInterface.register(CAUSAL_NAME, causal_attention)
        return CAUSAL_NAME
    if name != VARLEN:
        return name
    if not _KERNEL:
        register_varlen()
    return VARLEN_NAME


def check(model: Any, name: str, row: dict[str, torch.Tensor], labels: torch.Tensor, autocast: Callable[[], Any],
          tolerance: float = 1e-2) -> str | None:
    """Why `name` cannot train `model` (None when it can): one packed row's loss under `name` against SDPA's
    (evaluation mode: no dropout, no RNG drawn), and a backward through it, whose gradients are then dropped.
    `row`: input_ids and position_ids on the model's device; `labels` beside them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = base.config._attn_implementation
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast():
            reference = float(model(**row, labels=labels, use_cache=False).loss)
        set_implementation(model, name)
        inputs = dict(row)
        if name == VARLEN:
            inputs.update({k: v.to(labels.device) if isinstance(v, torch.Tensor) else v
                           for k, v in to_kwargs(row["position_ids"].cpu()).items()})
        with autocast():
            loss = model(**inputs, labels=labels, use_cache=False).loss
        loss.backward()
        ours = float(loss.detach())
    except Exception as exc:  # noqa: BLE001 - a kernel this GPU or this torch lacks: the next candidate trains
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        for parameter in model.parameters():
            parameter.grad = None
        base.set_attn_implementation(original)
        model.train(was_training)
    if not math.isclose(ours, reference, rel_tol=tolerance, abs_tol=tolerance):
        return f"its loss on a packed row ({ours:.4f}) differs from SDPA's ({reference:.4f})"
    return None


class TrainingAttention:
    """The attention implementation a run trains with, set on the model for its training steps; `plain()` gives
    the model's own back for evaluation and generation, `restore()` for good when the run ends."""

    def __init__(self, model: Any, name: str) -> None:
        self.model, self.name = model, name
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.original = self.base.config._attn_implementation
        if name != SDPA:
            self.base.set_attn_implementation(transformers_name(name))

    def restore(self) -> None:
        if self.name != SDPA:
            self.base.set_attn_implementation(self.original)

    @contextmanager
    def plain(self) -> Iterator[None]:
        if self.name == SDPA:
            yield
            return
        self.base.set_attn_implementation(self.original)
        try:
            yield
        finally:
            self.base.set_attn_implementation(transformers_name(self.name))


def set_implementation(model: Any, name: str) -> None:
    """Run `model` (a PeftModel or a transformers model) with attention `name`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(transformers_name(name))
