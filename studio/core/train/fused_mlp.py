"""A gated MLP whose gate and up adapters share an input computes their LoRA outputs and its SiLU·up in one kernel.

Llama's MLP is `down(silu(gate(x)) · up(x))`. With LoRA, PEFT writes each B product out (tokens × width), adds it to
the base output, and the SiLU·up reads both sums back; swiglu_kernel.py does the products, the adds and the SiLU·up
tile by tile without writing the products (on one Llama-3-8B layer: 0.945x the time of that layer's projections).

Which MLPs: a module with `gate_proj`, `up_proj`, `down_proj` and `act_fn` whose gate and up adapters are the two
adapters of one shared-input group (shared_input.py: plain LoRA, one active adapter, no dropout). Each is checked
before the first step: on a random input, its fused forward must give what its own forward gives (bf16 rounding
apart), which also proves that the activation is the SiLU and the forward Llama's. Only on a CUDA GPU, for bf16 or
fp16 outputs; anywhere else, and whenever the adapters have changed since (another adapter, merged, disabled), the
MLP runs its own forward.
"""

from __future__ import annotations

from typing import Any

import torch

from studio.core.train.shared_input import plain_lora_adapter

KERNEL_DTYPES = (torch.bfloat16, torch.float16)
TOLERANCE = 2e-2  # relative, on the check's output: bf16 rounds at 4e-3


def find_gated_mlps(model: Any) -> list[Any]:
    """The gated MLPs of `model` whose gate and up adapters share an input (after shared_input.Shared)."""
    found = []
    for module in model.modules():
        gate, up = getattr(module, "gate_proj", None), getattr(module, "up_proj", None)
        if gate is None or up is None or not all(hasattr(module, name) for name in ("down_proj", "act_fn")):
            continue
        group = getattr(gate, "_shared_group", None)
        if group is not None and getattr(up, "_shared_group", None) is group and len(group.layers) == 2:
            found.append(module)
    return found


class FusedMLPs:
    """The MLPs made to run the kernel (each one's class swapped, its state kept: one class and one forward for all,
    so that compiled layers still share one graph); `undo()` gives them their own forward back."""

    def __init__(self, mlps: list[Any]) -> None:
        self.mlps = mlps
        for mlp in mlps:
            mlp.__class__ = _fused_class(type(mlp))

    def check(self, autocast: Any) -> str:
        """Empty when the first MLP's fused forward gives its own forward's output on a random input, else why not.
        Until a check has imported the kernel (Triton: CUDA only), the MLPs run their own forward."""
        from studio.core.train import swiglu_kernel

        if not swiglu_kernel.AVAILABLE:
            return "Triton is not installed"
        for mlp in self.mlps:
            mlp._lora_swiglu = swiglu_kernel.lora_swiglu
        mlp = self.mlps[0]
        base = mlp.gate_proj.base_layer
        # a 4-bit base stores its weight packed in integers; its inputs come in its compute dtype
        dtype = base.weight.dtype if base.weight.is_floating_point() else base.compute_dtype
        x = torch.randn(1, 64, base.in_features, device=base.weight.device, dtype=dtype)
        with torch.no_grad(), autocast():
            if base(x).dtype not in KERNEL_DTYPES:
                return f"the kernel needs bf16 or fp16 outputs, the projections give {base(x).dtype}"
            own = super(type(mlp), mlp).forward(x).float()
            fused = mlp(x).float()
        error = ((fused - own).norm() / own.norm()).item()
        return "" if error < TOLERANCE else f"its output differs from the MLP's own by {error:.1e}"

    def undo(self) -> None:
        for mlp in self.mlps:
            mlp.__class__ = type(mlp).__bases__[0]
            mlp.__dict__.pop("_lora_swiglu", None)
        self.mlps = []


_CLASSES: dict[type, type] = {}


def _fused_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type("FusedLoRA" + base.__name__, (base,), {"forward": _fused_forward, "__module__": __name__})
    return _CLASSES[base]


def _fused_forward(mlp: Any, x: torch.Tensor) -> torch.Tensor:
    gate, up = mlp.gate_proj, mlp.up_proj
    group = gate._shared_group
    adapter = group.adapter
    lora_swiglu = getattr(mlp, "_lora_swiglu", None)
    if lora_swiglu is None or not x.is_cuda or plain_lora_adapter(gate) != adapter or plain_lora_adapter(up) != adapter:
        return super(type(mlp), mlp).forward(x)
    base_gate, base_up = gate.base_layer(x), up.base_layer(x)
    if base_gate.dtype not in KERNEL_DTYPES:
        return super(type(mlp), mlp).forward(x)
    act = lora_swiglu(base_gate, base_up, group.product(gate._shared_index, x), group.product(up._shared_index, x),
                      gate.lora_B[adapter].weight, up.lora_B[adapter].weight, gate.scaling[adapter],
                      up.scaling[adapter])
    return mlp.down_proj(act)
