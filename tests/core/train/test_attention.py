"""Packed rows keep their examples apart on every attention path, and batches lose only masks they do not need."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from studio.core import events as ev
from studio.core.data.dataset import Example, collate, pack
from studio.core.runconfig import ModelConfig, RunConfig, TrainingConfig
from studio.core.train import attention, losses
from studio.core.train.engine import train

LENGTHS = (5, 9, 3, 7, 6)  # examples packed into rows of 16: [5, 9], [3, 7, 6]


def examples(vocab: int) -> list[Example]:
    generator = torch.Generator().manual_seed(0)
    made = []
    for n in LENGTHS:
        ids = tuple(torch.randint(3, vocab, (n,), generator=generator).tolist())
        made.append(Example(ids, ids, n))
    return made


def alone(model, example: Example) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([example.input_ids]), use_cache=False).logits[0]


def packed_logits(model, rows: list[Example], name: str) -> torch.Tensor:
    batch = losses.to_device(collate(rows, 0), torch.device("cpu"), fused=False, attention=name)
    batch.pop("labels")
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def assert_each_example_alone(model, name: str) -> None:
    """Each example's logits in its packed row under attention `name`, against the example alone under SDPA."""
    items = examples(model.config.vocab_size)
    rows = pack(items, 16)
    assert sorted(len(r.input_ids) for r in rows) == [14, 16]
    expected = {item.input_ids: alone(model, item) for item in items}
    model.set_attn_implementation(attention.transformers_name(name))
    logits = packed_logits(model, list(rows), name)
    found = 0
    for row, packed in enumerate(rows):
        starts = [i for i, p in enumerate(packed.position_ids) if p == 0] + [len(packed.input_ids)]
        for start, end in zip(starts, starts[1:]):
            own = expected[packed.input_ids[start:end]]
            assert torch.allclose(logits[row, start:end], own, atol=1e-5), (name, row, start)
            found += 1
    assert found == len(items)


def reference_kernel(q, k, v, cu_seqlens, max_length, scale):
    """Causal attention over each sequence of the flat (tokens, heads, dim) inputs on its own, by SDPA."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds, bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                        enable_gqa=ks.shape[0] != qs.shape[0]).transpose(0, 1)
    assert max(b - a for a, b in zip(bounds, bounds[1:])) <= max_length
    return out


def test_to_kwargs_starts_a_sequence_at_each_row_example_and_padding():
    positions = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5]])
    kwargs = attention.to_kwargs(positions)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 6, 10, 12, 18]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32 and kwargs["max_length_q"] == 6


def test_sdpa_keeps_packed_examples_apart(tiny_llama):
    """What the CPU (and auto without packing) trains with: transformers' block-diagonal mask from the restarting
    position ids: each example's logits in a packed row are the example's logits alone."""
    assert_each_example_alone(tiny_llama.eval(), attention.SDPA)


def test_varlen_attention_keeps_packed_examples_apart_with_grouped_heads(tiny_llama):
    """The varlen path's own code (the cumulative lengths from the batch, the flat layout, grouped-query heads,
    the output's shape) over a kernel that attends within each sequence by SDPA: torch's varlen kernel is CUDA's
    (tests/core/train/test_gpu.py runs that one)."""
    assert tiny_llama.config.num_key_value_heads < tiny_llama.config.num_attention_heads
    attention.register_varlen(reference_kernel)
    try:
        assert_each_example_alone(tiny_llama.eval(), attention.VARLEN)
    finally:
        tiny_llama.set_attn_implementation(attention.SDPA)
        if attention.varlen_kernel() is not None:
            attention.register_varlen()


def test_a_right_padded_batch_loses_its_mask_and_keeps_its_logits(tiny_llama):
    items = examples(tiny_llama.config.vocab_size)
    batch = collate(items, 0)
    moved = losses.to_device(batch, torch.device("cpu"), fused=False)
    assert "attention_mask" not in moved and "attention_mask" in batch
    with torch.no_grad():
        masked = tiny_llama.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        unmasked = tiny_llama(input_ids=moved["input_ids"], use_cache=False).logits
    for row, item in enumerate(items):  # every real token sees what it saw with the mask
        n = len(item.input_ids)
        assert torch.allclose(masked[row, :n], unmasked[row, :n], atol=1e-5)
    left = dict(batch, attention_mask=batch["attention_mask"].flip(1))  # left padding is kept
    assert "attention_mask" in losses.to_device(left, torch.device("cpu"), fused=False)
    classes = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
               "labels": torch.zeros(len(items), dtype=torch.long)}
    assert "attention_mask" in losses.to_device(classes, torch.device("cpu"), fused=False)


def test_sdpa_causal_gives_sdpa_s_logits_and_transformers_looks_for_no_packed_rows(tiny_llama, monkeypatch):
    import transformers.masking_utils as masking

    looked = []
    real = masking.find_packed_sequence_indices
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda ids: looked.append(1) or real(ids))
    items = examples(tiny_llama.config.vocab_size)
    batch = losses.to_device(collate(items, 0), torch.device("cpu"), fused=False, attention=attention.CAUSAL)
    with torch.no_grad():
        plain = tiny_llama.eval()(input_ids=batch["input_ids"], use_cache=False).logits
        assert looked  # SDPA: transformers looks at its own position ids (on a GPU, a sync)
        looked.clear()
        attention.set_implementation(tiny_llama, attention.CAUSAL)
        causal = tiny_llama(input_ids=batch["input_ids"], use_cache=False).logits
    assert not looked
    assert torch.allclose(causal, plain, atol=1e-6)


def test_sdpa_causal_refuses_a_mask_and_a_sliding_window(tiny_llama):
    q = k = v = torch.zeros(1, 4, 8, 16)
    layer = tiny_llama.model.layers[0].self_attn
    with pytest.raises(RuntimeError, match="unmasked rows only"):
        attention.causal_attention(layer, q, k, v, torch.ones(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="unmasked rows only"):
        attention.causal_attention(layer, q, k, v, None, sliding_window=4)
    left = collate(examples(tiny_llama.config.vocab_size), 0)
    left["attention_mask"] = left["attention_mask"].flip(1)  # left padding keeps its mask: not for sdpa_causal
    with pytest.raises(RuntimeError, match="without a mask only"):
        losses.to_device(left, torch.device("cpu"), fused=False, attention=attention.CAUSAL)


def test_candidates_on_a_gpu_are_the_fast_paths_and_sdpa_elsewhere():
    assert attention.candidates("auto", is_cuda=False, packed=True) == [attention.SDPA]
    assert attention.candidates("auto", is_cuda=False, packed=False) == [attention.SDPA]
    assert attention.candidates("auto", is_cuda=True, packed=False) == [attention.CAUSAL, attention.SDPA]
    assert attention.candidates("sdpa", is_cuda=True, packed=False) == [attention.SDPA]
    assert attention.candidates("varlen", is_cuda=False, packed=True) == [attention.SDPA]
    assert attention.available("varlen", is_cuda=False) == "it needs a CUDA GPU"
    on_gpu = attention.candidates("auto", is_cuda=True, packed=True)
    assert on_gpu[-1] == attention.SDPA and set(on_gpu[:-1]) <= {attention.VARLEN, attention.FLEX}


def test_a_packed_cpu_run_trains_on_sdpa_and_says_why_varlen_is_off(tiny_model_folder, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"text": "{"word " * (3 + i % 7)}end"}}\n' for i in range(24)))
    results = {}
    for setting in ("auto", "varlen"):
        config = RunConfig(
            model=ModelConfig(source=str(tiny_model_folder), device="cpu"),
            plan={"targets": "all-linear", "rank": 4, "alpha": 8, "dropout": 0.0},
            data={"train_path": str(data), "format": "text", "max_length": 32, "packing": True},
            training=TrainingConfig(max_steps=3, batch_size=2, eval_every=0, eval_examples=0, save_every=0,
                                    spectrum_every=0, attention=setting),
            output_dir=str(tmp_path / setting),
        )
        events: list = []
        assert isinstance(train(config, events.append), ev.Finished)
        steps = [e for e in events if isinstance(e, ev.StepMetrics)]
        assert all(0.5 < e.token_efficiency <= 1.0 for e in steps)  # packed rows: little padding, if any
        logs = [(e.level, e.text) for e in events if isinstance(e, ev.LogMessage)]
        results[setting] = ([e.loss for e in steps], logs)
    assert not [text for _, text in results["auto"][1] if "attention" in text]
    assert ("warning", "attention varlen is off for this run: it needs a CUDA GPU") in results["varlen"][1]
    assert results["varlen"][0] == results["auto"][0] and all(math.isfinite(x) for x in results["auto"][0])


@pytest.mark.parametrize("value", ["flash", "SDPA"])
def test_the_run_file_names_the_attention_choices(value):
    from studio.core.errors import RunConfigError

    with pytest.raises(RunConfigError, match="training.attention"):
        RunConfig.from_dict({"plan": {"targets": "all-linear"}, "data": {"train_path": "x.jsonl"},
                             "training": {"attention": value}})

