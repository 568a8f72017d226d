"""Adapters that read the same input compute their first product together.

In a decoder layer q_proj, k_proj and v_proj read the same hidden states, as gate_proj and up_proj read the same
normed ones. LoRA gives each its own x·Aᵀ: a thin matmul of rank r, launched once in forward and twice in
backward. Stacked, x·[A_q; A_k; A_v]ᵀ is one matmul of rank 3r whose columns are the three products: the same
sums, fewer and wider kernels (on an H200: +2-5% tokens/s at the 1B shape, +2% at the 8B one; bench/README.md).

Which adapters share an input is found, not assumed from module names: one forward records each adapter's input,
and adapters called one after another on the very same tensor form a group. At run time an adapter still checks
that its input is the group's (`is`) and computes its own product when it is not.

Only PEFT's plain LoRA layers are grouped, where the forward is `base(x) + B(A(x))·scaling`: its 16-bit Linear and
its 4-bit one (QLoRA; PEFT's forward there also copies the base output, which a grouped layer does not need), one
active adapter, no dropout (each adapter draws its own mask: one product would share it), no DoRA, not merged,
adapters enabled.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import torch

MIN_GROUP = 2


class _Group:
    """The adapters of one shared input, in call order, and the product of the input being served."""

    def __init__(self, layers: list[Any], adapter: str) -> None:
        self.layers, self.adapter = layers, adapter
        self.source: torch.Tensor | None = None  # the input whose product `parts` holds
        self.parts: tuple[torch.Tensor, ...] = ()
        self.served = 0

    def product(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """x·Aᵀ of the group's `index`-th adapter, from one product for all of them."""
        if self.source is not x:
            weights = [layer.lora_A[self.adapter].weight for layer in self.layers]
            read = self.layers[0]._cast_input_dtype(x, weights[0].dtype)  # as PEFT's forward casts it
            product = torch.nn.functional.linear(read, torch.cat(weights))
            self.parts = product.split([w.shape[0] for w in weights], -1)
            self.source, self.served = x, 0
        part = self.parts[index]
        self.served += 1
        if self.served == len(self.layers):  # all served: hold no activation past the layer
            self.source, self.parts = None, ()
        return part


def plain_lora_adapter(layer: Any) -> str | None:
    """The adapter name when `layer` is PEFT's plain LoRA Linear (16-bit or 4-bit) whose forward is
    base(x) + B(A(x))·scaling."""
    kind = type(layer)
    kind = kind.__bases__[0] if kind in _CLASSES.values() else kind  # PEFT's, or PEFT's made to share (Shared)
    if kind not in _lora_linear_classes():
        return None
    if layer.merged or layer.disable_adapters or len(layer.active_adapters) != 1:
        return None
    adapter = layer.active_adapters[0]
    if adapter not in layer.lora_A or adapter in getattr(layer, "lora_variant", {}):  # DoRA and other variants
        return None
    if not isinstance(layer.lora_dropout[adapter], torch.nn.Identity):
        return None
    return adapter


def _lora_linear_classes() -> tuple[type, ...]:
    from peft.tuners.lora import bnb
    from peft.tuners.lora.layer import Linear

    four_bit = getattr(bnb, "Linear4bit", None)  # defined where bitsandbytes is installed
    return (Linear,) if four_bit is None else (Linear, four_bit)


def _stackable(layer: Any, other: Any) -> bool:
    """Whether the two adapters' A matrices stack into one: the same width and dtype."""
    a, b = (x.lora_A[plain_lora_adapter(x)].weight for x in (layer, other))
    return a.shape[1] == b.shape[1] and a.dtype == b.dtype


def find_groups(model: Any, inputs: dict[str, torch.Tensor],
                autocast: Callable[[], AbstractContextManager] = nullcontext) -> list[list[Any]]:
    """The plain LoRA layers of `model` that read the same tensor, one after another, in one forward of `inputs`
    (evaluation mode, no gradients, under the run's `autocast`): groups of two or more, in call order."""
    calls: list[tuple[Any, torch.Tensor]] = []

    def record(layer: Any, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            calls.append((layer, args[0]))

    layers = [m for m in model.modules() if plain_lora_adapter(m) is not None]
    if len(layers) < MIN_GROUP:
        return []
    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    groups: list[list[Any]] = []
    run: list[Any] = []
    source = None
    for layer, x in calls:
        if not (run and x is source and layer not in run and _stackable(layer, run[0])):
            if len(run) >= MIN_GROUP:
                groups.append(run)
            run, source = [], x
        run.append(layer)
    if len(run) >= MIN_GROUP:
        groups.append(run)
    return groups


class Shared:
    """Groups whose layers compute their first product together; `undo()` gives the layers PEFT's forward back.
    Each layer becomes a SharedInputLinear (its class swapped, its state kept): one class, one forward for every
    layer, so a compiled decoder layer still traces into one graph that all layers share."""

    def __init__(self, groups: list[list[Any]]) -> None:
        self.groups = [_Group(layers, plain_lora_adapter(layers[0])) for layers in groups]  # type: ignore[arg-type]
        for group in self.groups:
            for index, layer in enumerate(group.layers):
                layer._shared_group, layer._shared_index = group, index
                layer.__class__ = _shared_class(type(layer))

    def undo(self) -> None:
        for group in self.groups:
            for layer in group.layers:
                layer.__class__ = type(layer).__bases__[0]
                del layer._shared_group, layer._shared_index
        self.groups = []


_CLASSES: dict[type, type] = {}


def _shared_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type("SharedInput" + base.__name__, (base,),
                              {"forward": _grouped_forward, "__module__": __name__})
    return _CLASSES[base]


def _grouped_forward(layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    group: _Group = layer._shared_group
    adapter = group.adapter
    if args or kwargs or plain_lora_adapter(layer) != adapter:  # switched since: PEFT's own forward
        return super(type(layer), layer).forward(x, *args, **kwargs)
    result = layer.base_layer(x)
    update = layer.lora_B[adapter](group.product(layer._shared_index, x)) * layer.scaling[adapter]
    return (result + update).to(result.dtype)
