"""The chunked linear cross-entropy gives HF's causal-LM loss and gradients (ignored rows, padding, token weighting
across micro-batches), refuses heads it cannot reproduce, and drives a real engine run to the same losses."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from studio.core import events as ev
from studio.core.data.dataset import demo_spec
from studio.core.errors import RunConfigError
from studio.core.runconfig import ModelConfig, RunConfig, TrainingConfig
from studio.core.train import losses
from studio.core.train.engine import train


@pytest.fixture()
def small_chunks(monkeypatch):
    """Chunks of a few rows, so every test crosses chunk boundaries (a vocabulary of 128: 5 rows a chunk)."""
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 5 * 128)


def lora_model(model, **config):
    torch.manual_seed(1)
    settings = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    settings.update(config)
    return get_peft_model(model, LoraConfig(**settings))


def padded_batch():
    """Two rows: a prompt that does not count (-100) and right padding, as data.collate makes them."""
    torch.manual_seed(2)
    input_ids = torch.randint(0, 128, (2, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = input_ids.clone()
    labels[0, :4] = -100
    labels[1, 9:] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask}, labels


def test_chunked_cross_entropy_and_its_gradient_equal_the_plain_one(small_chunks):
    torch.manual_seed(0)
    hidden = torch.randn(23, 16, requires_grad=True)
    weight = torch.randn(128, 16)
    targets = torch.randint(0, 128, (23,))
    targets[[0, 7, 8, 22]] = -100
    num_items = 40  # more than this batch counts: the other micro-batches' tokens weigh in
    ours = losses.LinearCrossEntropy.apply(hidden, weight, targets, num_items, losses._softmax_grad)
    (grad_ours,) = torch.autograd.grad(ours * 3.0, hidden)
    plain = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100, reduction="sum")
    plain = plain / num_items
    (grad_plain,) = torch.autograd.grad(plain * 3.0, hidden)
    assert ours.item() == pytest.approx(plain.item(), rel=1e-6)
    torch.testing.assert_close(grad_ours, grad_plain, rtol=1e-5, atol=1e-7)
    assert grad_ours[[0, 7, 8, 22]].abs().max() == 0


def test_causal_lm_loss_matches_hf_loss_and_lora_gradients(tiny_llama, small_chunks):
    model = lora_model(tiny_llama)
    inputs, labels = padded_batch()
    counted = int((labels[:, 1:] != -100).sum())
    num_items = counted + 7
    plain = model(**inputs, labels=labels, use_cache=False, num_items_in_batch=num_items).loss
    plain.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    positions, targets = losses.select_targets(labels)
    assert len(targets) == counted
    ours = losses.causal_lm_loss(model, inputs, positions, targets, num_items)
    ours.backward()
    assert ours.item() == pytest.approx(plain.item(), rel=1e-5)
    assert len(expected) == 3 * 7 * 2
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_select_targets_is_the_shift_by_one():
    labels = torch.tensor([[5, 6, -100, 8], [-100, 1, 2, -100]])
    positions, targets = losses.select_targets(labels)
    assert positions.tolist() == [0, 2, 4, 5]  # row 0 predicts 6 at 0 and 8 at 2; row 1 predicts 1, 2
    assert targets.tolist() == [6, 8, 1, 2]


def test_blocker_accepts_a_lora_model_and_refuses_what_it_cannot_reproduce(tiny_llama):
    assert "trained" in losses.blocker(tiny_llama)  # a full fine-tune trains the (tied) head
    assert losses.blocker(lora_model(copy.deepcopy(tiny_llama))) is None
    adapted_head = lora_model(copy.deepcopy(tiny_llama), target_modules=["q_proj", "lm_head"])
    assert "adapted" in losses.blocker(adapted_head)
    capped = lora_model(copy.deepcopy(tiny_llama))
    capped.get_base_model().config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in losses.blocker(capped)


def test_the_numeric_guard_catches_a_head_that_scales_its_logits():
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    config = CohereConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128, logit_scale=0.25)
    model = lora_model(CohereForCausalLM(config))
    assert "logit_scale" in losses.blocker(model)
    inputs, labels = padded_batch()
    assert not losses.matches_model(model, inputs, labels)
    model.get_base_model().logit_scale = 1.0  # now the head is the plain product
    assert losses.matches_model(model, inputs, labels)
    assert model.training  # the guard's evaluation mode does not leak


def test_fast_path_switches_are_validated():
    with pytest.raises(RunConfigError, match="fused_loss"):
        RunConfig.from_dict({"plan": {"targets": "all-linear"}, "data": {"train_path": "x.jsonl"},
                             "training": {"fused_loss": "yes please"}})
    config = RunConfig.from_dict({"plan": {"targets": "all-linear"}, "data": {"train_path": "x.jsonl"},
                                  "training": {"compile_layers": False}})
    assert config.training.compile_layers is False and config.training.fused_loss == "auto"


def test_engine_run_with_the_chunked_loss_gives_the_same_losses(fresh_default_model, tmp_path):
    """Two micro-batches a step: the divisor is the step's counted tokens, as in the plain path. The tolerance is
    fp32's over a 49k vocabulary: HF's log-softmax sums in fp32 (on this data it is 1.6e-5 off a float64 reference,
    the chunked loss's logsumexp 1e-7)."""
    demo = demo_spec()
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(Path(demo.train_path).read_text().splitlines()[:8]) + "\n")
    results = {}
    for fused in (False, True):
        config = RunConfig(
            model=ModelConfig(source="default", device="cpu"),
            plan={"targets": "q_proj,v_proj", "rank": 4, "alpha": 8, "dropout": 0.0},
            data={"train_path": str(data), "format": "instruction", "max_length": 64},
            training=TrainingConfig(max_steps=2, batch_size=2, gradient_accumulation=2, learning_rate=3e-3,
                                    warmup_ratio=0.0, eval_every=0, eval_examples=0, save_every=0,
                                    spectrum_every=0, fused_loss=fused),
            output_dir=str(tmp_path / f"runs-{fused}"),
        )
        loaded = copy.copy(fresh_default_model)
        loaded.model = copy.deepcopy(fresh_default_model.model)
        events: list = []
        assert isinstance(train(config, events.append, loaded=loaded), ev.Finished)
        results[fused] = [(e.loss, e.grad_norm) for e in events if isinstance(e, ev.StepMetrics)]
    assert len(results[True]) == 2
    for (loss, norm), (loss_plain, norm_plain) in zip(results[True], results[False]):
        assert math.isclose(loss, loss_plain, rel_tol=2e-4) and math.isclose(norm, norm_plain, rel_tol=2e-4)
