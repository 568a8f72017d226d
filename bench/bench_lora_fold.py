"""Would folding LoRA into the base matmuls pay? One Llama-3-8B-shaped layer's q/k/v and gate/up (with SiLU·up),
forward and backward, compiled, 8 × 1024 tokens, r=16, bf16 (GPU). Six ways, timed alternately in one run:
  base      the frozen matmuls alone: the floor any LoRA path stands on
  engine    as the engine trains: separate base matmuls, one shared x·Aᵀ product per group (shared_input.py),
            each adapter's B product added to its output
  fold-k    LoRA concatenated along K: y = [x, x·Aᵀ]·[W, s·B]ᵀ, one matmul per group (the group's base weights and
            its Bs block-diagonal in one buffer); backward from the same products: [dx, d(x·Aᵀ)] = dy·[W, s·B]
  merged    the engine's LoRA on base weights stored as one matrix per group (one q/k/v matmul, one gate/up
            matmul, outputs split)
  pointwise-b  the engine's, with each B product written as r broadcast products summed (no matmul), so that the
            compiler can fuse it into the add and the SiLU·up instead of writing it out
  swiglu-kernel  q/k/v as the engine's; gate/up's B products, their adds and the SiLU·up in one Triton kernel
            (swiglu_kernel.py), forward and backward
Prints first what the GPU gives each base matmul alone, then each way's time per layer and its ratio to `engine`,
and checks that each way gives the engine's gradients (to bf16 rounding). Results in bench/README.md. Not a timed
test.

    python bench/bench_lora_fold.py [--rounds 2] [--seconds 2]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from studio.core.train.swiglu_kernel import lora_swiglu

HIDDEN, MLP, Q, KV, TOKENS, RANK, SCALE = 4096, 14336, 4096, 1024, 8 * 1024, 16, 2.0
BF16 = torch.bfloat16


class Group:
    """One shared input's projections: frozen bf16 weights (separate and as one matrix), float32 A and B."""

    def __init__(self, widths: list[int]) -> None:
        self.widths = widths
        self.merged = torch.randn(sum(widths), HIDDEN, device="cuda", dtype=BF16) * 0.02
        self.separate = [w.clone() for w in self.merged.split(widths)]
        self.a = [(torch.randn(RANK, HIDDEN, device="cuda") * 0.02).requires_grad_() for _ in widths]
        self.b = [(torch.randn(n, RANK, device="cuda") * 0.02).requires_grad_() for n in widths]
        # fold-k's buffer: the base weights, then the Bs block-diagonal (rewritten before each forward)
        self.folded = torch.zeros(sum(widths), HIDDEN + RANK * len(widths), device="cuda", dtype=BF16)
        self.folded[:, :HIDDEN] = self.merged

    def params(self) -> list[torch.Tensor]:
        return [*self.a, *self.b]


def add_lora(x: torch.Tensor, outputs, group: Group) -> list[torch.Tensor]:
    products = F.linear(x, torch.cat(group.a)).split(RANK, -1)
    return [(out + F.linear(p, b) * SCALE).to(BF16) for out, p, b in zip(outputs, products, group.b)]


def add_lora_pointwise(x: torch.Tensor, outputs, group: Group) -> list[torch.Tensor]:
    """The B products as a sum of r broadcast products, which the compiler can fuse into the adds around them
    (eager, it would build a tokens × r × width tensor)."""
    products = F.linear(x, torch.cat(group.a)).split(RANK, -1)
    return [(out + (p.unsqueeze(-1) * b.t()).sum(-2) * SCALE).to(BF16) for out, p, b in zip(outputs, products, group.b)]


class FoldK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, folded, a, ranks, *bs):
        flat = x.reshape(-1, x.shape[-1])
        a16 = a.to(BF16)
        joined = torch.cat([flat, flat @ a16.t()], 1)
        ctx.save_for_backward(joined, folded, a16)
        ctx.meta = (x.shape, a.dtype, [b.shape[0] for b in bs], ranks)
        return (joined @ folded.t()).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        joined, folded, a16 = ctx.saved_tensors
        shape, a_dtype, widths, ranks = ctx.meta
        hidden = shape[-1]
        grad = grad.reshape(-1, grad.shape[-1])
        grad_joined = grad @ folded
        grad_product = grad_joined[:, hidden:]
        grad_x = torch.addmm(grad_joined[:, :hidden], grad_product, a16)
        grad_a = (grad_product.t() @ joined[:, :hidden]).to(a_dtype)
        outer = grad.t() @ joined[:, hidden:]  # every output's gradient against every product: keep the diagonal
        grad_bs, row = [], 0
        for k, width in enumerate(widths):
            grad_bs.append((outer[row:row + width, k * ranks:(k + 1) * ranks] * SCALE).float())
            row += width
        return grad_x.view(shape), None, grad_a, None, *grad_bs


def fold_k(x: torch.Tensor, group: Group) -> list[torch.Tensor]:
    with torch.no_grad():
        row = 0
        for k, b in enumerate(group.b):
            group.folded[row:row + b.shape[0], HIDDEN + k * RANK:HIDDEN + (k + 1) * RANK] = (b * SCALE).to(BF16)
            row += b.shape[0]
    return list(FoldK.apply(x, group.folded, torch.cat(group.a), RANK, *group.b).split(group.widths, -1))


def layer(way: str, x_attn: torch.Tensor, x_mlp: torch.Tensor, qkv: Group, mlp: Group) -> list[torch.Tensor]:
    with torch.autocast("cuda", dtype=BF16):
        if way == "base":
            outs = [[F.linear(x, w) for w in g.separate] for x, g in ((x_attn, qkv), (x_mlp, mlp))]
        elif way == "engine":
            outs = [add_lora(x, [F.linear(x, w) for w in g.separate], g) for x, g in ((x_attn, qkv), (x_mlp, mlp))]
        elif way == "pointwise-b":
            outs = [add_lora_pointwise(x, [F.linear(x, w) for w in g.separate], g)
                    for x, g in ((x_attn, qkv), (x_mlp, mlp))]
        elif way == "swiglu-kernel":
            q, k, v = add_lora(x_attn, [F.linear(x_attn, w) for w in qkv.separate], qkv)
            products = F.linear(x_mlp, torch.cat(mlp.a)).split(RANK, -1)
            gate, up = (F.linear(x_mlp, w) for w in mlp.separate)
            return [q, k, v, lora_swiglu(gate, up, *products, *mlp.b, SCALE, SCALE)]
        elif way == "merged":
            outs = [add_lora(x, F.linear(x, g.merged).split(g.widths, -1), g) for x, g in ((x_attn, qkv), (x_mlp, mlp))]
        else:
            outs = [fold_k(x, g) for x, g in ((x_attn, qkv), (x_mlp, mlp))]
    gate, up = outs[1]
    return [*outs[0], F.silu(gate) * up]


def sustained_rate(product, flops: int, seconds: float) -> float:
    """TFLOP/s of `product` run back to back for `seconds` (after as long again to warm up): under a sustained load
    the GPU reaches its power limit and lowers its clock, which a burst of a few calls would not show."""
    rate = 0.0
    for _ in range(2):  # the first round warms the GPU up to its steady clock
        calls, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            for _ in range(10):
                product()
            torch.cuda.synchronize()
            calls += 10
        rate = flops * calls / (time.perf_counter() - began) / 1e12
    return rate


def matmul_ceiling(seconds: float) -> None:
    """Each of the layer's base matmuls alone, forward (x·Wᵀ) and the input's gradient (dy·W), sustained: what the
    GPU gives these shapes at all, the ceiling for any way of adding LoRA to them."""
    for name, (out, inner) in {"q": (Q, HIDDEN), "k or v": (KV, HIDDEN), "gate or up": (MLP, HIDDEN)}.items():
        weight = torch.randn(out, inner, device="cuda", dtype=BF16)
        x = torch.randn(TOKENS, inner, device="cuda", dtype=BF16)
        dy = torch.randn(TOKENS, out, device="cuda", dtype=BF16)
        flops = 2 * TOKENS * out * inner
        forward = sustained_rate(lambda: F.linear(x, weight), flops, seconds)
        gradient = sustained_rate(lambda: dy @ weight, flops, seconds)
        clock = torch.cuda.clock_rate() if hasattr(torch.cuda, "clock_rate") else "?"
        print(f"{name:10s} alone, sustained: forward {forward:.0f} TFLOP/s, the input's gradient {gradient:.0f} "
              f"TFLOP/s (SM clock at the end: {clock} MHz)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of all the ways")
    parser.add_argument("--seconds", type=float, default=2.0, help="each base matmul's sustained run alone")
    args = parser.parse_args()
    torch.manual_seed(0)
    matmul_ceiling(args.seconds)
    qkv, mlp = Group([Q, KV, KV]), Group([MLP, MLP])
    inputs = [torch.randn(1, TOKENS, HIDDEN, device="cuda", dtype=BF16, requires_grad=True) for _ in range(2)]
    grads = [torch.randn(1, TOKENS, n, device="cuda", dtype=BF16) for n in (Q, KV, KV, MLP)]
    leaves = [*inputs, *qkv.params(), *mlp.params()]
    ways = ("base", "engine", "fold-k", "merged", "pointwise-b", "swiglu-kernel")
    compiled = {way: torch.compile(lambda *a, w=way: layer(w, *a)) for way in ways}

    def step(way: str) -> None:
        torch.autograd.backward(compiled[way](*inputs, qkv, mlp), grads)

    reference = None
    for way in ways[1:]:  # the engine's gradients first, then each other way's against them
        for _ in range(2):
            step(way)
        for leaf in leaves:
            leaf.grad = None
        step(way)
        got = [leaf.grad.to(torch.float32, copy=True) for leaf in leaves]
        if reference is None:
            reference = got
            continue
        worst = max(((g - r).norm() / r.norm()).item() for g, r in zip(got, reference))
        print(f"{way:13s} gradients against the engine's: largest relative difference {worst:.1e}")
    times: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(args.rounds):
        for way in ways:
            step(way)
            torch.cuda.synchronize()
            began = time.perf_counter()
            for _ in range(20):
                step(way)
            torch.cuda.synchronize()
            times[way].append((time.perf_counter() - began) / 20 * 1000)
    engine = min(times["engine"])
    flops = 2 * 2 * TOKENS * HIDDEN * (Q + 2 * KV + 2 * MLP)  # forward and the input's gradient; the weights frozen
    print(f"base: its matmuls' work over its whole time (SiLU·up and autograd included): "
          f"{flops / min(times['base']) / 1e9:.0f} TFLOP/s")
    for way in ways:
        best = min(times[way])
        print(f"{way:13s} {best:6.2f} ms per layer (rounds: {', '.join(f'{t:.2f}' for t in times[way])}), "
              f"{best / engine:.3f}x the engine's time")


if __name__ == "__main__":
    main()
