"""Merging an adapter into its base: one plain model folder, checked on a probe, the caller's model untouched."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open

from studio.core.adapters.merging import merge_and_save
from studio.core.errors import ExportError, WriteError
from studio.core.files import atomic_folder
from studio.core.progress import Progress
from tests.core.adapters.lora_models import logits, lora_modules, randomize_lora_b


def test_float32_merge_opens_with_auto_class_and_leaves_the_adapter_model_as_it_was(adapted, probe, tmp_path):
    from transformers import AutoModelForCausalLM

    loaded, peft_model, _ = adapted
    before = logits(peft_model, probe)
    peft_model.train()
    events: list[Progress] = []
    report = merge_and_save(peft_model, loaded.tokenizer, tmp_path / "merged", dtype="float32",
                            probe_input_ids=probe[0].tolist(), on_progress=events.append)

    assert report.dtype == "float32" and report.path == str(tmp_path / "merged")
    assert 0 < report.max_logit_diff < 1e-4 and report.saved_logit_diff == report.max_logit_diff
    assert [e.stage for e in events][0] == "merge" and events[-1].stage == "done" and events[-1].fraction == 1.0
    assert all(a.fraction <= b.fraction for a, b in zip(events, events[1:]))
    assert max(e.fraction for e in events if e.stage == "merge") == pytest.approx(0.7)  # merging is 70% of the bar
    saved = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= saved
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temp folder left behind
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (logits(merged, probe) - before).abs().max() < 1e-4

    assert peft_model.training  # the caller's train/eval mode is given back
    assert len(lora_modules(peft_model)) == 60
    assert not any(peft_model.get_submodule(n).merged for n in lora_modules(peft_model))
    peft_model.eval()
    assert torch.equal(logits(peft_model, probe), before)


def test_bfloat16_merge_writes_bfloat16_weights_and_replaces_the_studios_earlier_folder(adapted, probe, tmp_path):
    loaded, peft_model, _ = adapted
    before = logits(peft_model, probe)
    out = tmp_path / "merged"
    with atomic_folder(out, "merged model") as staging:
        (staging / "stale.txt").write_text("from an earlier merge")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a person's")
    with pytest.raises(WriteError, match="mine holds files the studio did not write"):  # refused before merging
        merge_and_save(peft_model, loaded.tokenizer, tmp_path / "mine", dtype="bfloat16")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    report = merge_and_save(peft_model, loaded.tokenizer, out, dtype="bfloat16")
    assert torch.equal(logits(peft_model, probe), before)  # casting the copy left the caller's float32 weights

    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        dtypes = {handle.get_slice(key).get_dtype() for key in handle.keys()}
    assert dtypes == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not (out / "stale.txt").exists()
    assert report.dtype == "bfloat16"
    # the merge itself is exact to float32 rounding; saving in bf16 adds its own, larger rounding
    assert report.max_logit_diff < 1e-4 < report.saved_logit_diff


def test_merging_into_an_adapted_tied_embedding_unties_it(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    # a transformers-made GGUF model keeps a GGUF quantization_config; the merged save must not write it
    tiny_llama.config.quantization_config = {"quant_method": "gguf"}
    peft_model = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    randomize_lora_b(peft_model)
    ids = torch.tensor([[5, 17, 99, 3, 42, 8]])
    report = merge_and_save(peft_model, None, tmp_path / "merged", probe_input_ids=ids)

    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and "quantization_config" not in config
    assert report.notes and "tied" in report.notes[0]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert report.max_logit_diff < 1e-5
    assert (logits(merged, ids) - logits(peft_model, ids)).abs().max() < 1e-5


def test_merging_into_a_4bit_base_is_refused_with_the_way_out(tiny_llama, tmp_path):
    from transformers import BitsAndBytesConfig

    tiny_llama.config.quantization_config = BitsAndBytesConfig(load_in_4bit=True)  # what a bnb 4-bit load carries
    peft_model = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=["q_proj"]))
    refusal = r"quantized base \(4-bit \(bitsandbytes\)\).*reopen the base without quantization"
    with pytest.raises(ExportError, match=refusal):
        merge_and_save(peft_model, None, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()

