"""An estimate of the GPU memory a LoRA run needs, broken into the parts a person can act on.

Parts: frozen weights at their precision (4-bit NF4 with double quantisation, 8-bit or 16/32-bit), the adapter
(float32), its gradients, the optimizer states (AdamW: two float32 moments per trainable parameter, 8-bit
AdamW: two bytes), the activations kept for backward for one micro-batch, and the CUDA context.

Activations are what autograd keeps for backward, counted per token and decoder layer from the module tree:
- the two norms' float32 inputs (RMSNorm and LayerNorm compute in float32 whatever the weights' dtype): 2·h·4 bytes;
- attention: q, k, v and its output (what a flash kernel keeps), the widths of the block's attention projections;
- the MLP: each up-projection's output (kept by the activation or the product after it) and, for a gated MLP, the
  activation's output: 3·I for Llama's gate/up/down;
- the adapters: their input, once for the adapters that read the same one (the engine turns off PEFT's cast of
  the input to the adapter's float32 under autocast, which the cast back undid, so q, k and v keep one tensor;
  counted once per block, parent module and input width; with DoRA, whose math needs the cast, one copy per
  adapter), the rank-wide product lora_B reads, with LoRA dropout its mask (a byte per input value), under mixed
  precision autocast's copy of the weights. Frozen base layers keep nothing for backward: their weight is all
  their input's gradient needs.
The other values are in the compute dtype. tests/core/model/test_memory.py checks the count against the tensors
torch's saved_tensors_hooks see in a real LoRA forward. With gradient checkpointing only each layer's input
(h values per token) is kept, plus one layer's full activations while it is recomputed.

The logits depend on the loss path. The model's own loss costs b·s·V·(2 + 4 + 4) bytes (the bf16 logits, their
float32 upcast and the float32 log-softmax kept for backward). The engine's chunked loss (losses.py, its default)
holds one chunk of LOSS_CHUNK_ELEMENTS logits at a time, in bf16, float32 softmax and bf16 gradient.

A 4-bit or 8-bit base keeps the same activations as a 16-bit one: bitsandbytes' matmul keeps no input (only the
quantised weight, which is held anyway), and it dequantises one weight at a time for its product, forward and
backward: the largest such weight in the compute dtype is added.

Checked against the measured peak on an H200 (bench/bench_engine.py: Llama-3.2-1B shape, r=16 all-linear, 8 × 1024
tokens, bf16, the chunked loss, eager layers): LoRA 15.8 GiB estimated against 16.4 measured, QLoRA 14.5 against
15.0. (QLoRA once peaked at 23.1 GiB: PEFT's prepare_model_for_kbit_training, which the engine no longer calls,
made the norms float32, and bitsandbytes' Linear4bit then returned float32 outputs.) Compiled layers keep less
(13.2 GiB for LoRA); with the model's own loss the peak was 28.5 GiB.

On several GPUs (DDP, `gpus` > 1) each GPU holds all of the above for its own micro-batch (with the chunked loss
too, which DDP's forward runs), plus the buckets in
which DDP all-reduces the gradients (accelerate leaves `gradient_as_bucket_view` off, so they are a second copy
of the adapter's float32 gradients): the estimate is per GPU.

Under FSDP (`sharded`, accelerate's FSDP2 as resources/accelerate/fsdp.yaml sets it up) each GPU keeps 1/gpus of
the base weights, of the adapter, of its gradients (reduce-scattered, no DDP buckets) and of the optimizer states,
and gathers whole weights only while they are used: two decoder layers at a time (the one running and the next,
prefetched) and the output head, which accelerate keeps gathered from its forward through its backward. The
activations are those of the GPU's own micro-batch, on the model's own loss (the chunked loss would use the head's
weight outside the forward that gathers it). What shards is checked in the suite (every
parameter of a run is a 1/N slice); the per-GPU peak on two H200s (bench_multi_gpu.py --fsdp, batch 1 with gradient
checkpointing): Llama-3-8B shape 11.3 GiB estimated against 11.2 measured (DDP, then on the model's own loss: 17.5
against 17.4), 1B shape 3.4 against 3.3 (DDP: 3.9 against 4.1).

It ignores: attention score matrices (it assumes SDPA / flash kernels, which do not materialise them), the
allocator's fragmentation and caching, temporary buffers inside kernels, and the tokenizer and data loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from studio.core.errors import PlanError
from studio.core.model.inventory import DTYPE_BYTES, ModuleTree
from studio.core.model.plan import LoraPlan, PlanCounts

Verdict = Literal["fits", "tight", "will-not-fit", "unknown"]
# What a process holds on the GPU outside PyTorch's allocator once CUDA is up and the kernels a training step
# uses are loaded: the driver's context plus those kernel images. Not measured here: a round figure between the
# two numbers in PyTorch's own measurement when it made lazy kernel loading the default (pytorch/pytorch#86509:
# 287 MB with CUDA_MODULE_LOADING=LAZY, 667 MB eager); lazy loading grows towards the eager figure as a run
# loads its matmul, attention and optimizer kernels. It varies with the GPU, driver and CUDA version.
CUDA_CONTEXT_BYTES = 512 * 2**20
# "fits" up to this share of the card. A judgement, not a measurement: the H100 check above found the real
# peak 12-13% over this estimate's allocated part (28.5/25.3, 18.4/16.5 GiB), so an estimate at 85% of the
# card puts the real peak near 96%, and the caching allocator needs the rest: it reserves more than it hands
# out (blocks rounded up, segments split and cached). From 85% to 100% the verdict is "tight".
FITS_SHARE = 0.85
NF4_BYTES_PER_PARAM = (4 + 0.127) / 8  # 4-bit codes plus double-quantised absmax per 64-value block
GIB = 2**30
LOSS_CHUNK_ELEMENTS = 2**27  # losses.CHUNK_ELEMENTS (tests/core/model/test_memory.py keeps the two equal)
NORMS = 2  # norms in a decoder layer (before attention and before the MLP), each keeping its float32 input


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    adapter: int
    gradients: int
    optimizer: int
    activations: int
    cuda_context: int

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.gradients + self.optimizer + self.activations + self.cuda_context

    @property
    def allocated(self) -> int:
        """What torch.cuda.max_memory_allocated() should show: the total without the CUDA context."""
        return self.total - self.cuda_context

    def parts(self) -> list[tuple[str, int]]:
        """(label, bytes) for a stacked bar: weights / adapter + optimizer / activations / context."""
        return [
            ("weights", self.weights),
            ("adapter + gradients + optimizer", self.adapter + self.gradients + self.optimizer),
            ("activations", self.activations),
            ("CUDA context", self.cuda_context),
        ]


@dataclass(frozen=True)
class Fit:
    verdict: Verdict
    advice: str  # one line: what to change when it does not fit, empty when it fits comfortably


@dataclass(frozen=True)
class _Shape:
    layers: int
    hidden: int
    vocab: int
    attention: int  # values a token keeps per layer in attention: q, k, v and the attention output
    mlp: int  # values a token keeps per layer in the MLP: the up-projections' outputs, a gated one's product


def _shape(tree: ModuleTree) -> _Shape:
    """The decoder's shape read from the module tree (its first block), not from a table per architecture."""
    blocks = {info.block_index for info in tree.modules.values() if info.block_index is not None}
    embeddings = [i for i in tree.modules.values() if i.kind == "embedding"]
    vocab_embedding = max(embeddings, key=lambda i: i.in_features or 0, default=None)
    hidden = int(vocab_embedding.out_features or 0) if vocab_embedding else 0
    vocab = int(vocab_embedding.in_features or 0) if vocab_embedding else 0
    first = min(blocks, default=None)
    linears = [i for i in tree.modules.values() if i.kind in ("linear", "conv1d") and i.block_index == first]
    # q, k, v (or a fused qkv) and the output projection: their widths add up to q + k + v + the attention output
    attention = sum(int(i.out_features or 0) for i in linears if i.in_attention) or 4 * hidden
    ups = [int(i.out_features or 0) for i in linears if not i.in_attention and i.out_features != hidden]
    mlp = sum(ups) + (min(ups) if len(ups) > 1 else 0) if ups else 12 * hidden
    return _Shape(len(blocks), hidden, vocab, attention, mlp)


def _block_params(tree: ModuleTree) -> int:
    """The parameters of the largest decoder block."""
    sizes: dict[int, int] = {}
    for info in tree.modules.values():
        if info.block_index is not None:
            sizes[info.block_index] = sizes.get(info.block_index, 0) + info.own_params
    return max(sizes.values(), default=0)


def _kept_inputs(tree: ModuleTree, plan: LoraPlan) -> int:
    """Values per token the adapters keep as their inputs: one tensor for the adapters of a block that read the
    same input (same parent module and input width: q, k and v; gate and up), one per adapter for DoRA."""
    if plan.variant == "dora":
        return sum(int(tree[n].in_features or 0) for n in plan.targets)
    shared = {(tree[n].block_index, n.rpartition(".")[0], int(tree[n].in_features or 0)) for n in plan.targets}
    return sum(width for _, _, width in shared)


def estimate(
    tree: ModuleTree,
    plan: LoraPlan,
    counts: PlanCounts,
    *,
    batch_size: int = 1,
    seq_len: int = 512,
    compute_dtype: str = "bfloat16",
    quantization: str | None = None,
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
    chunked_loss: bool = True,
    gpus: int = 1,
    sharded: bool = False,
) -> MemoryEstimate:
    """Estimate the GPU memory of a run (of each GPU when `gpus` > 1; `batch_size` is per GPU). Cheap (a pass over
    the tree), safe to call on every slider move. `counts`: `plan.count(tree, plan)`, which the caller has already
    made (the adapter panel shows it too). `chunked_loss`: the engine's default; it does not apply when the output
    head is adapted or saved, nor under FSDP. `sharded`: FSDP across the `gpus`."""
    for name, value in (("batch size", batch_size), ("sequence length", seq_len), ("number of GPUs", gpus)):
        if value < 1:
            raise PlanError(f"the {name} must be at least 1, got {value}")
    dtype_bytes = DTYPE_BYTES.get(compute_dtype, 2)
    weights = 0.0
    for info in tree.modules.values():
        own = info.own_params
        quantizable = info.kind in ("linear", "conv1d") and not info.is_output_head and not info.is_classifier_head
        if quantization == "4bit" and quantizable:
            weights += own * NF4_BYTES_PER_PARAM
        elif quantization == "8bit" and quantizable:
            weights += own * 1.0
        else:
            weights += own * dtype_bytes
    trainable = counts.trainable
    adapter = trainable * 4
    gradients = trainable * 4 * (2 if gpus > 1 and not sharded else 1)  # DDP's all-reduce buckets: a second copy
    optimizer_bytes = trainable * (2 if optimizer == "adamw-8bit" else 8)

    shape = _shape(tree)
    if sharded:  # each GPU's slice, and the whole weights it gathers at once
        weights = weights / gpus + (2 * _block_params(tree) + shape.vocab * shape.hidden) * dtype_bytes
        adapter, gradients, optimizer_bytes = adapter / gpus, gradients / gpus, optimizer_bytes / gpus
    tokens = batch_size * seq_len
    # per token: the adapters' inputs and rank-wide products; with dropout, each adapter's mask (a byte a value)
    adapted_inputs = sum(int(tree[n].in_features or 0) for n in plan.targets)
    adapters = (_kept_inputs(tree, plan) + sum(plan.rank_of(n) for n in plan.targets)) * dtype_bytes
    adapters += adapted_inputs if plan.dropout > 0 else 0
    per_layer = NORMS * shape.hidden * 4 + (shape.attention + shape.mlp) * dtype_bytes
    if gradient_checkpointing:  # each layer's input, and one layer's whole share while it is recomputed
        kept = tokens * (shape.layers * shape.hidden * dtype_bytes + per_layer + adapters / max(shape.layers, 1))
    else:
        kept = tokens * (shape.layers * per_layer + adapters)
    kept += tokens * shape.hidden * 4  # the final norm's float32 input
    if dtype_bytes < 4:  # mixed precision: autocast's copies of the float32 adapter weights, kept for backward
        kept += trainable * dtype_bytes
    if quantization is not None:  # bitsandbytes dequantises one weight at a time for its matmul
        kept += max((info.own_params for info in tree.modules.values() if info.kind in ("linear", "conv1d")
                     and not info.is_output_head and not info.is_classifier_head), default=0) * dtype_bytes
    heads = {name for name, info in tree.modules.items() if info.is_output_head}
    changed = set(plan.targets) | set(plan.modules_to_save)  # modules_to_save may name leaves ("lm_head")
    head_changed = any(name in changed or tree[name].leaf in changed for name in heads)
    if tree.task != "causal-lm":
        logits = 0
    elif chunked_loss and not head_changed and not sharded:
        logits = min(tokens * shape.vocab, LOSS_CHUNK_ELEMENTS) * (2 + 4 + 2)
    else:
        logits = tokens * shape.vocab * (2 + 4 + 4)
    return MemoryEstimate(
        weights=int(weights),
        adapter=int(adapter),
        gradients=int(gradients),
        optimizer=int(optimizer_bytes),
        activations=int(kept + logits),
        cuda_context=CUDA_CONTEXT_BYTES,
    )


def judge(estimate_: MemoryEstimate, available_bytes: int | None, *, gradient_checkpointing: bool = False,
          quantization: str | None = None, batch_size: int = 1) -> Fit:
    """A plain verdict against the GPU's memory, and what to change when it does not fit (at most three
    changes). The activation levers (batch, checkpointing, sequence length) come first only when the activations
    are larger than the overshoot: below it, even dropping them all would not make the run fit."""
    if not available_bytes:
        return Fit("unknown", "no GPU found: the estimate is for a CUDA run")
    ratio = estimate_.total / available_bytes
    if ratio <= FITS_SHARE:
        return Fit("fits", "")
    suggestions = []
    if estimate_.activations > estimate_.total - FITS_SHARE * available_bytes:
        if batch_size > 1:
            suggestions.append("lower the batch size (use gradient accumulation)")
        if not gradient_checkpointing:
            suggestions.append("turn on gradient checkpointing")
        suggestions.append("shorten the maximum sequence length")
    if quantization is None:
        suggestions.append("load the base in 4-bit (QLoRA)")
    suggestions.append("lower the rank or target fewer layers")
    verdict: Verdict = "tight" if ratio <= 1.0 else "will-not-fit"
    need = f"needs ~{estimate_.total / GIB:.1f} GiB of {available_bytes / GIB:.1f} GiB"
    return Fit(verdict, f"{need}: " + ", or ".join(suggestions[:3]))


def gpu_memory_bytes(device: int = 0) -> int | None:
    """Total memory of the CUDA device, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(device).total_memory)
