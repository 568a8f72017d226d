"""A gated MLP's two LoRA outputs and its SiLU·up in one Triton kernel, forward and backward (CUDA only).

    act = silu(G + sg·Mg·Bgᵀ) · (U + su·Mu·Buᵀ)

G and U are the base projections' outputs (tokens × width), Mg and Mu the adapters' first products x·Aᵀ (tokens ×
r), Bg and Bu their B matrices (width × r). PEFT writes each B product out (tokens × width), adds it to the base
output and the SiLU·up reads both sums back; here each tile computes its rank-r products on the tensor cores and
never writes them (on one Llama-3-8B layer: 0.45 ms of the 1.4 ms LoRA added to the base matmuls, bench/README.md).
Backward recomputes the products the same way and writes the gradients of G and U, from which those of Mg, Mu, Bg
and Bu follow as thin matmuls. The sums are float32 in the kernel, rounded once (PEFT rounds each product and each
sum to bf16): the same math to bf16 rounding.

`lora_swiglu` is a torch custom op (opaque to torch.compile, which calls it from a compiled layer's graph) with its
own backward; fused_mlp.py puts it in a gated MLP's forward. Traced by torch.compile as a plain autograd.Function
instead, the same kernels made the layer 1.26x slower: as a custom op the compiler leaves them alone.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # torch's CPU builds come without Triton: the kernels run where it is, on CUDA
    triton = tl = None

AVAILABLE = triton is not None

def _jit(kernel):
    return triton.jit(kernel) if AVAILABLE else kernel


BLOCK_T, BLOCK_N, NUM_WARPS = 64, 64, 4  # the best of seven tried on an H200 (bench/README.md)
RANK_MULTIPLE = 16  # the tensor cores' smallest inner dimension: r is padded up to it with zeros


@_jit
def _gate_up(base_g, base_u, mid_g, mid_u, b_g, b_u, rows, cols, T, N, ranks, scale_g, scale_u,
             stride_base, stride_mid_g, stride_mid_u, stride_b_g, stride_b_u):
    rmask = rows < T
    cmask = cols < N
    both = rmask[:, None] & cmask[None, :]
    mg = tl.load(mid_g + rows[:, None] * stride_mid_g + ranks[None, :], mask=rmask[:, None], other=0.0)
    mu = tl.load(mid_u + rows[:, None] * stride_mid_u + ranks[None, :], mask=rmask[:, None], other=0.0)
    bg = tl.load(b_g + cols[None, :] * stride_b_g + ranks[:, None], mask=cmask[None, :], other=0.0)
    bu = tl.load(b_u + cols[None, :] * stride_b_u + ranks[:, None], mask=cmask[None, :], other=0.0)
    offsets = rows[:, None] * stride_base + cols[None, :]
    g = tl.load(base_g + offsets, mask=both, other=0.0).to(tl.float32) + tl.dot(mg, bg) * scale_g
    u = tl.load(base_u + offsets, mask=both, other=0.0).to(tl.float32) + tl.dot(mu, bu) * scale_u
    return g, u, offsets, both


@_jit
def _forward_kernel(base_g, base_u, mid_g, mid_u, b_g, b_u, out, T, N, scale_g, scale_u,
                    stride_base, stride_mid_g, stride_mid_u, stride_b_g, stride_b_u,
                    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    g, u, offsets, both = _gate_up(base_g, base_u, mid_g, mid_u, b_g, b_u, rows, cols, T, N, tl.arange(0, R),
                                   scale_g, scale_u, stride_base, stride_mid_g, stride_mid_u, stride_b_g, stride_b_u)
    tl.store(out + offsets, (g * tl.sigmoid(g) * u).to(out.dtype.element_ty), mask=both)


@_jit
def _backward_kernel(grad_act, base_g, base_u, mid_g, mid_u, b_g, b_u, grad_g, grad_u, T, N, scale_g, scale_u,
                     stride_base, stride_mid_g, stride_mid_u, stride_b_g, stride_b_u,
                     BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    g, u, offsets, both = _gate_up(base_g, base_u, mid_g, mid_u, b_g, b_u, rows, cols, T, N, tl.arange(0, R),
                                   scale_g, scale_u, stride_base, stride_mid_g, stride_mid_u, stride_b_g, stride_b_u)
    d = tl.load(grad_act + offsets, mask=both, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(grad_u + offsets, (d * g * sig).to(grad_u.dtype.element_ty), mask=both)
    tl.store(grad_g + offsets, (d * u * sig * (1.0 + g * (1.0 - sig))).to(grad_g.dtype.element_ty), mask=both)


def _unit_columns(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The rank-wide tensors as the kernels index them: rows of unit column stride (a split of the group's product
    is one already)."""
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def _launch(kernel, tensors: tuple, base: torch.Tensor, mids: tuple, bs: tuple, scales: tuple) -> None:
    rows, width = base.shape
    grid = (triton.cdiv(rows, BLOCK_T), triton.cdiv(width, BLOCK_N))
    kernel[grid](*tensors, rows, width, *scales, base.stride(0), mids[0].stride(0), mids[1].stride(0),
                 bs[0].stride(0), bs[1].stride(0), BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, R=mids[0].shape[1],
                 num_warps=NUM_WARPS)


@torch.library.custom_op("lora_studio::lora_swiglu", mutates_args=())
def _lora_swiglu(base_g: torch.Tensor, base_u: torch.Tensor, mid_g: torch.Tensor, mid_u: torch.Tensor,
                 b_g: torch.Tensor, b_u: torch.Tensor, scale_g: float, scale_u: float) -> torch.Tensor:
    base_g, base_u = base_g.contiguous(), base_u.contiguous()  # the large ones share one row stride
    mid_g, mid_u, b_g, b_u = _unit_columns(mid_g, mid_u, b_g, b_u)
    out = torch.empty_like(base_g)
    _launch(_forward_kernel, (base_g, base_u, mid_g, mid_u, b_g, b_u, out), base_g, (mid_g, mid_u), (b_g, b_u),
            (scale_g, scale_u))
    return out


@_lora_swiglu.register_fake
def _(base_g, base_u, mid_g, mid_u, b_g, b_u, scale_g, scale_u):
    return torch.empty_like(base_g)


@torch.library.custom_op("lora_studio::lora_swiglu_backward", mutates_args=())
def _lora_swiglu_backward(grad_act: torch.Tensor, base_g: torch.Tensor, base_u: torch.Tensor, mid_g: torch.Tensor,
                          mid_u: torch.Tensor, b_g: torch.Tensor, b_u: torch.Tensor, scale_g: float, scale_u: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    grad_act, base_g, base_u = grad_act.contiguous(), base_g.contiguous(), base_u.contiguous()
    mid_g, mid_u, b_g, b_u = _unit_columns(mid_g, mid_u, b_g, b_u)
    grad_g, grad_u = torch.empty_like(base_g), torch.empty_like(base_u)
    _launch(_backward_kernel, (grad_act, base_g, base_u, mid_g, mid_u, b_g, b_u, grad_g, grad_u), base_g,
            (mid_g, mid_u), (b_g, b_u), (scale_g, scale_u))
    return grad_g, grad_u


@_lora_swiglu_backward.register_fake
def _(grad_act, base_g, base_u, mid_g, mid_u, b_g, b_u, scale_g, scale_u):
    return torch.empty_like(base_g), torch.empty_like(base_u)


def _setup_context(ctx, inputs, output) -> None:
    base_g, base_u, mid_g, mid_u, b_g, b_u, scale_g, scale_u = inputs
    ctx.save_for_backward(base_g, base_u, mid_g, mid_u, b_g, b_u)
    ctx.scales = (scale_g, scale_u)


def _backward(ctx, grad_act):
    base_g, base_u, mid_g, mid_u, b_g, b_u = ctx.saved_tensors
    scale_g, scale_u = ctx.scales
    grad_g, grad_u = _lora_swiglu_backward(grad_act, base_g, base_u, mid_g, mid_u, b_g, b_u, scale_g, scale_u)
    # the LoRA outputs' gradients are those of the sums: the thin matmuls PEFT's backward does too
    return (grad_g, grad_u, (grad_g @ b_g) * scale_g, (grad_u @ b_u) * scale_u,
            (grad_g.t() @ mid_g) * scale_g, (grad_u.t() @ mid_u) * scale_u, None, None)


_lora_swiglu.register_autograd(_backward, setup_context=_setup_context)


def lora_swiglu(base_g: torch.Tensor, base_u: torch.Tensor, mid_g: torch.Tensor, mid_u: torch.Tensor,
                b_g: torch.Tensor, b_u: torch.Tensor, scale_g: float, scale_u: float) -> torch.Tensor:
    """silu(base_g + scale_g·mid_g·b_gᵀ) · (base_u + scale_u·mid_u·b_uᵀ), in base_g's dtype and shape. The Bs may be
    float32 (the adapter's own weights): they are read in the outputs' dtype, as autocast would, and their
    gradients come back in their own."""
    shape, dtype = base_g.shape, base_g.dtype
    rank = mid_g.shape[-1]
    flat = [t.reshape(-1, t.shape[-1]) for t in (base_g, base_u)]
    mids = [m.reshape(-1, m.shape[-1]).to(dtype) for m in (mid_g, mid_u)]
    bs = [b.to(dtype) for b in (b_g, b_u)]
    padding = -rank % RANK_MULTIPLE
    if padding:  # zero columns add nothing to the products
        mids = [torch.nn.functional.pad(m, (0, padding)) for m in mids]
        bs = [torch.nn.functional.pad(b, (0, padding)) for b in bs]
    return _lora_swiglu(*flat, *mids, *bs, float(scale_g), float(scale_u)).view(shape)
