from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig, GPT2Config

from studio.core.errors import PlanError
from studio.core.model import inventory


def peft_all_linear(model):
    """The modules PEFT itself wraps for target_modules="all-linear"."""
    from peft.tuners.lora import LoraLayer

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules="all-linear"))
    inner = peft_model.base_model.model
    return sorted(name for name, module in inner.named_modules() if isinstance(module, LoraLayer))


def test_all_linear_preset_equals_peft_all_linear_on_the_default_model(default_model):
    tree = inventory.build(default_model.model)
    found = inventory.presets(tree)
    assert sorted(found["all-linear"]) == peft_all_linear(default_model.model)
    assert len(found["attention"]) == 4 * 30 and len(found["mlp"]) == 3 * 30
    assert {tree[n].leaf for n in found["peft-default"]} == {"q_proj", "v_proj"}


def test_default_model_tree_shapes_and_tied_head(default_model):
    tree = inventory.build(default_model.model)
    assert tree.total_params == sum(p.numel() for p in default_model.model.parameters())
    q = tree["model.layers.3.self_attn.q_proj"]
    assert (q.kind, q.in_features, q.out_features, q.own_params) == ("linear", 576, 576, 576 * 576)
    assert (q.block_index, q.pattern) == (3, "model.layers.*.self_attn.q_proj")
    head = tree["lm_head"]
    assert head.is_output_head and head.own_params == 0 and head.held_params == 49152 * 576  # tied
    assert tree["model.embed_tokens"].kind == "embedding" and tree["model.embed_tokens"].shape == "49152×576"
    assert not tree["model.norm"].targetable and "LlamaRMSNorm" in tree["model.norm"].why_not


def test_gpt2_presets_split_fused_attention_and_mlp():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    tree = inventory.build(model)
    found = inventory.presets(tree)
    assert {tree[n].name.split(".", 3)[-1] for n in found["attention"]} == {"attn.c_attn", "attn.c_proj"}
    assert {tree[n].name.split(".", 3)[-1] for n in found["mlp"]} == {"mlp.c_fc", "mlp.c_proj"}
    assert sorted(found["all-linear"]) == peft_all_linear(model)
    c_attn = tree["transformer.h.0.attn.c_attn"]
    assert (c_attn.kind, c_attn.in_features, c_attn.out_features) == ("conv1d", 32, 96)


def test_bert_classifier_head_is_not_a_lora_target_and_peft_default_is_query_value():
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=64, num_labels=3)
    model = AutoModelForSequenceClassification.from_config(config)
    tree = inventory.build(model, "seq-cls")
    assert tree.classifier_head == "classifier"
    assert not tree["classifier"].targetable and "modules_to_save" in tree["classifier"].why_not
    found = inventory.presets(tree)
    assert {tree[n].leaf for n in found["peft-default"]} == {"query", "value"}
    assert "classifier" not in found["all-linear"]
    assert "bert.encoder.layer.0.attention.output.dense" in found["attention"]
    assert "bert.encoder.layer.0.output.dense" in found["mlp"]


def test_select_understands_leaf_names_globs_regexes_and_presets(tiny_llama):
    tree = inventory.build(tiny_llama)
    assert inventory.select(tree, "q_proj") == [f"model.layers.{i}.self_attn.q_proj" for i in range(3)]
    assert inventory.select(tree, "model.layers.1.mlp.*") == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert inventory.select(tree, r"re:model\.layers\.[02]\.self_attn\.v_proj") == [
        "model.layers.0.self_attn.v_proj", "model.layers.2.self_attn.v_proj"]
    assert len(inventory.select(tree, "attention,mlp")) == 21
    with pytest.raises(PlanError, match="'nope' matches no LoRA-targetable module"):
        inventory.select(tree, "nope")
    with pytest.raises(PlanError, match="cannot target model.norm"):
        inventory.select(tree, "model.norm")


def test_filter_names_keeps_substring_glob_and_regex(tiny_llama):
    tree = inventory.build(tiny_llama)
    assert inventory.filter_names(tree, "Q_PROJ") == [f"model.layers.{i}.self_attn.q_proj" for i in range(3)]
    assert inventory.filter_names(tree, "*.2.mlp") == ["model.layers.2.mlp"]
    assert inventory.filter_names(tree, "re:(") == []  # a half-typed regex filters to nothing, no error


def test_tree_of_a_meta_model_counts_without_weights():
    from transformers import LlamaConfig
    from transformers.initialization import no_init_weights

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                         vocab_size=1000)
    with torch.device("meta"), no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    tree = inventory.build(model)
    assert tree.total_params == sum(p.numel() for p in model.parameters())
    assert tree["model.layers.0.mlp.up_proj"].dtype == "float32"
