"""FSDP: a base too big for one GPU, sharded across the run's processes (accelerate's FSDP2, torch's fully_shard).

Each decoder layer becomes one shard group (accelerate wraps the classes the model names in `_no_split_modules`);
every process keeps a 1/N slice of each weight, the frozen base and the LoRA factors alike, and gathers a layer's
whole weights only while that layer runs. The adapter's gradients are reduce-scattered and its optimizer state is
sharded the same way. What needs whole LoRA matrices (the saved adapter, checkpoints, spectra) gathers them here,
a collective every process joins; the frozen base is never gathered.

accelerate (1.x) turns FSDP on only for GPU-family process groups: in AcceleratorState the switch sits in the
MULTI_GPU/NPU/XPU branch, so CPU processes over gloo stay MULTI_CPU (DDP) under an FSDP config. torch's fully_shard
runs on the CPU over gloo all the same, so for CPU processes `enable_on_cpu` sets the state accelerate sets on GPUs
and the suite runs accelerate's own FSDP2 path, on the same engine code as a GPU run.
"""

from __future__ import annotations

import os
from typing import Any

ENV = "ACCELERATE_USE_FSDP"  # accelerate launch sets it (with FSDP_*) from a config whose distributed_type is FSDP


def requested() -> bool:
    """Whether this process was launched with an FSDP config."""
    return os.environ.get(ENV, "false").lower() == "true"


def enable_on_cpu(accelerator: Any) -> None:
    """On CPU processes, the FSDP state accelerate gives GPU processes: its plugin read from the same FSDP_*
    variables, and the distributed type that routes `prepare`, `no_sync`, `backward` and `clip_grad_norm_`
    through its FSDP2 code."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP


def configure(accelerator: Any) -> str | None:
    """Settings the engine needs from accelerate's FSDP plugin before `prepare`; a reason it cannot train, or None.

    Under mixed precision the gradients are reduced in float32: only the adapter has gradients, so this costs
    little, and it keeps the sum DDP computes (accelerate's default reduces in the compute dtype). Outputs are not
    cast: accelerate's default casts them to the compute dtype, which rounded the model's float32 loss to bf16
    (measured on two H200s: the reported losses moved in steps of 1/32)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        return (f"FSDP version {plugin.fsdp_version} is not supported: set fsdp_config.fsdp_version: 2 "
                "(resources/accelerate/fsdp.yaml)")
    if plugin.activation_checkpointing:
        return "fsdp_activation_checkpointing is not used here: set training.gradient_checkpointing: true instead"
    if plugin.cpu_ram_efficient_loading:
        return ("fsdp_cpu_ram_efficient_loading is not supported yet: set it to false (every process reads the base "
                "into host memory, then keeps only its slice on its GPU)")
    policy = plugin.mixed_precision_policy
    if isinstance(policy, MixedPrecisionPolicy) and policy.param_dtype is not None:
        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=policy.param_dtype,
                                                             reduce_dtype=torch.float32,
                                                             output_dtype=None)
    return None


def is_sharded(model: Any) -> bool:
    """Whether `model` was sharded by fully_shard (its parameters are DTensors, each process holding a slice)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_trainable_state(model: Any) -> dict[str, Any]:
    """The trainable tensors of a sharded model, whole, by parameter name, on the main process's CPU (an empty dict
    on the others). A collective: every process calls it. The frozen base is not gathered."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def full_optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The optimizer's state, whole and keyed by parameter name (not by position), on the main process's CPU: plain
    tensors that `torch.load(weights_only=True)` reads, and that load on any number of processes. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, _inner(optimizer), options=options)


def load_optimizer_state(model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Put `full_optimizer_state`'s dict back, each process taking its slice. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, _inner(optimizer), state, options=StateDictOptions(full_state_dict=True))


def is_keyed_by_name(optimizer_state: dict[str, Any]) -> bool:
    """Whether a saved optimizer state is `full_optimizer_state`'s (keys are parameter names), not torch's own."""
    return any(isinstance(key, str) for key in optimizer_state.get("state", {}))


def _inner(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside accelerate's wrapper
