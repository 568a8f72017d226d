"""Counts must equal what PEFT itself reports for the same config, and the adapter file size what it writes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForSequenceClassification, BertConfig, GPT2Config

from studio.core.errors import PlanError
from studio.core.model import inventory
from studio.core.model.loading import open_model
from studio.core.model.plan import LoraPlan, compact_targets, count, to_peft_config, validate


def peft_numbers(model, tree, plan, save_to: Path | None = None):
    peft_model = get_peft_model(copy.deepcopy(model), to_peft_config(plan, tree))
    trainable, total = peft_model.get_nb_trainable_parameters()
    size = None
    if save_to is not None:
        peft_model.save_pretrained(save_to, save_embedding_layers=False)
        size = (save_to / "adapter_model.safetensors").stat().st_size
    return trainable, total, size


def plan_for(tree, spec, **kwargs):
    return LoraPlan(targets=tuple(inventory.select(tree, spec)), **kwargs)


@pytest.fixture(scope="module")
def gpt2_seq_cls():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, num_labels=2, pad_token_id=0)
    return AutoModelForSequenceClassification.from_config(config)


@pytest.mark.parametrize("rank", [1, 8])
def test_count_matches_peft_for_gpt2_seq_cls_c_attn_c_proj(gpt2_seq_cls, rank, tmp_path):
    tree = inventory.build(gpt2_seq_cls, "seq-cls")
    plan = plan_for(tree, "c_attn,c_proj", rank=rank, alpha=2 * rank)
    ours = count(tree, plan)
    trainable, total, size = peft_numbers(gpt2_seq_cls, tree, plan, tmp_path)
    assert (ours.trainable, ours.total, ours.adapter_bytes) == (trainable, total, size)
    assert ours.saved_modules == 64 * 2  # the score head (no bias) is saved in full, as PEFT does for SEQ_CLS
    assert tree["transformer.h.0.attn.c_attn"].kind == "conv1d"


def test_count_matches_peft_for_llama_7b_config_in_plan_mode(tmp_path):
    config = {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    loaded = open_model(str(path))
    assert loaded.plan_only
    tree = inventory.build(loaded.model)
    plan = plan_for(tree, "q_proj,v_proj", rank=8)
    ours = count(tree, plan)
    trainable, total, _ = peft_numbers(loaded.model, tree, plan)
    assert (ours.trainable, ours.total) == (trainable, total) == (4_194_304, 6_742_609_920)


def test_count_matches_peft_for_all_linear_on_the_default_model(default_model, tmp_path):
    tree = inventory.build(default_model.model)
    plan = plan_for(tree, "all-linear", rank=8, alpha=16)
    ours = count(tree, plan)
    trainable, total, size = peft_numbers(default_model.model, tree, plan, tmp_path)
    assert (ours.trainable, ours.total, ours.adapter_bytes) == (trainable, total, size)
    assert ours.modules == 210


@pytest.mark.parametrize(
    "spec, kwargs",
    [
        ("all-linear", {"variant": "dora"}),
        ("all-linear,embed_tokens", {"variant": "dora", "rank": 4}),
        ("q_proj,v_proj", {"rank_overrides": {"model.layers.1.self_attn.q_proj": 2},
                           "alpha_overrides": {"model.layers.0.self_attn.v_proj": 3.0}}),
        ("all-linear", {"variant": "rslora", "rank": 16}),
        ("all-linear", {"modules_to_save": ("lm_head",)}),  # tied to the embeddings, yet copied in full
    ],
)
def test_count_matches_peft_for_variants_overrides_and_saved_modules(tiny_llama, spec, kwargs, tmp_path):
    tree = inventory.build(tiny_llama)
    plan = plan_for(tree, spec, **kwargs)
    ours = count(tree, plan)
    assert (ours.trainable, ours.total, ours.adapter_bytes) == peft_numbers(tiny_llama, tree, plan, tmp_path)


def test_rank_override_reaches_the_peft_layer(tiny_llama):
    tree = inventory.build(tiny_llama)
    plan = plan_for(tree, "q_proj", rank=8, rank_overrides={"model.layers.2.self_attn.q_proj": 2})
    peft_model = get_peft_model(copy.deepcopy(tiny_llama), to_peft_config(plan, tree))
    layers = peft_model.base_model.model.model.layers
    assert layers[2].self_attn.q_proj.lora_A["default"].weight.shape == (2, 64)
    assert layers[1].self_attn.q_proj.lora_A["default"].weight.shape == (8, 64)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_count_matches_peft_for_bias_modes_on_bert_seq_cls(bias, tmp_path):
    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=128, num_labels=3)
    model = AutoModelForSequenceClassification.from_config(config)
    tree = inventory.build(model, "seq-cls")
    plan = plan_for(tree, "all-linear", rank=4, bias=bias)
    ours = count(tree, plan)
    assert ours.bias > 0
    assert (ours.trainable, ours.total, ours.adapter_bytes) == peft_numbers(model, tree, plan, tmp_path)


def test_compact_targets_uses_leaf_names_only_when_every_match_is_selected(tiny_llama):
    tree = inventory.build(tiny_llama)
    assert compact_targets(tree, inventory.select(tree, "q_proj,v_proj")) == ["q_proj", "v_proj"]
    one = ["model.layers.0.self_attn.q_proj"]
    assert compact_targets(tree, one) == one


def test_validate_rejects_a_rank_larger_than_the_layer(tiny_llama):
    tree = inventory.build(tiny_llama)
    with pytest.raises(PlanError, match=r"rank 100 is larger than model.layers.0.self_attn.k_proj \(64→32\)"):
        validate(tree, plan_for(tree, "k_proj", rank=100))


def test_validate_rejects_untargetable_and_unknown_modules(tiny_llama):
    tree = inventory.build(tiny_llama)
    with pytest.raises(PlanError, match="not a module of this model"):
        validate(tree, LoraPlan(targets=("model.layers.9.mlp.up_proj",)))
    with pytest.raises(PlanError, match="cannot target model.norm"):
        validate(tree, LoraPlan(targets=("model.norm",)))
    with pytest.raises(PlanError, match="no target modules"):
        validate(tree, LoraPlan(targets=()))


def test_plan_round_trips_through_a_dict(tiny_llama):
    tree = inventory.build(tiny_llama)
    plan = plan_for(tree, "attention", rank=4, variant="dora", rank_overrides={"model.layers.0.self_attn.q_proj": 2})
    again = LoraPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    with pytest.raises(PlanError, match="unknown plan field"):
        LoraPlan.from_dict({"targets": [], "rnak": 3})
