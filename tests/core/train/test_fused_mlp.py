"""Which gated MLPs get the LoRA + SiLU·up kernel (fused_mlp.py), and that off a GPU they keep PEFT's numbers.
The kernel itself runs on a CUDA GPU only: tests/core/train/test_gpu.py checks its losses against the plain path."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from studio.core.train import fused_mlp, shared_input


def adapted(model, **lora):
    torch.manual_seed(1)
    settings = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, LoraConfig(**{**settings, **lora}))


def shared(model):
    return shared_input.Shared(shared_input.find_groups(model, {"input_ids": torch.randint(0, 128, (1, 8))}))


def test_every_decoder_layer_s_mlp_is_found_once_gate_and_up_share_an_input(tiny_llama):
    model = adapted(tiny_llama)
    assert fused_mlp.find_gated_mlps(model) == []  # not before their adapters share an input
    shared(model)
    mlps = fused_mlp.find_gated_mlps(model)
    assert mlps == [layer.mlp for layer in model.get_base_model().model.layers]


def test_a_4bit_base_s_mlps_are_found_too(tiny_llama_4bit):
    model = adapted(tiny_llama_4bit)
    shared(model)
    mlps = fused_mlp.find_gated_mlps(model)
    assert mlps == [layer.mlp for layer in model.get_base_model().model.layers]
    assert type(mlps[0].gate_proj).__name__ == "SharedInputLinear4bit"


def test_mlps_whose_gate_and_up_do_not_share_an_input_are_left_alone(tiny_llama):
    model = adapted(tiny_llama, lora_dropout=0.1)  # dropout: each adapter its own product, no groups
    shared(model)
    assert fused_mlp.find_gated_mlps(model) == []
    model = adapted(tiny_llama.__class__(tiny_llama.config), target_modules=["gate_proj", "down_proj"])
    shared(model)  # gate alone: up has no adapter to share with
    assert fused_mlp.find_gated_mlps(model) == []


def test_off_a_gpu_a_fused_mlp_gives_peft_s_output_and_undo_gives_its_class_back(tiny_llama):
    model = adapted(tiny_llama)
    ids = torch.randint(0, 128, (2, 12))
    shared(model)
    with torch.no_grad():
        own = model(input_ids=ids, use_cache=False).logits
    mlp = model.get_base_model().model.layers[0].mlp
    own_class = type(mlp)
    fused = fused_mlp.FusedMLPs(fused_mlp.find_gated_mlps(model))
    assert type(mlp).__name__ == "FusedLoRA" + own_class.__name__
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, own)
    fused.undo()
    assert type(mlp) is own_class
