"""Saving an adapter as PEFT writes it, atomically, with the embeddings only when the vocabulary grew."""

from __future__ import annotations

import copy
import json
import resource

import pytest
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

from studio.core.adapters.loading import load_adapter
from studio.core.adapters.saving import save_adapter
from studio.core.errors import ExportError, WriteError
from tests.core.adapters.lora_models import logits, randomize_lora_b


def test_saved_adapter_loads_in_plain_peft_with_equallogits(default_model, adapted, probe, tmp_path):
    _, peft_model, counts = adapted
    out = save_adapter(peft_model, tmp_path / "run" / "adapter", base_model_spec="default")

    assert sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".safetensors")) == [
        "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == default_model.folder  # transformers can open it; "default" it cannot
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert len(keys) == 2 * 60 and all(".lora_A." in k or ".lora_B." in k for k in keys)  # no embedding copies
    assert (out / "adapter_model.safetensors").stat().st_size == counts.adapter_bytes

    reloaded = PeftModel.from_pretrained(copy.deepcopy(default_model.model), str(out))
    adapter_logits = logits(peft_model, probe)
    assert (logits(reloaded, probe) - adapter_logits).abs().max() < 1e-5
    assert (adapter_logits - logits(default_model.model, probe)).abs().max() > 1e-2


def test_resized_vocabulary_saves_the_embedding_matrices(fresh_default_model, tmp_path):
    model = fresh_default_model.model
    model.resize_token_embeddings(model.config.vocab_size + 8)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    out = save_adapter(peft_model, tmp_path / "adapter")
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as handle:
        shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    assert shapes["base_model.model.model.embed_tokens.weight"] == [49160, 576]

    model = peft_model.unload()
    model.resize_token_embeddings(49152)  # back to the base's own vocabulary: the saved copies no longer fit
    expected = r"holds (lm_head|model\.embed_tokens)\.weight as 49160×576, but it is 49152×576 here"
    with pytest.raises(ExportError, match=expected):
        load_adapter(fresh_default_model, out)


def test_failed_save_leaves_the_previous_adapter_intact(adapted, tmp_path):
    _, peft_model, _ = adapted
    out = save_adapter(peft_model, tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    randomize_lora_b(peft_model, seed=1)

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # the OS refuses files past 64 KiB, as a full disk
    try:
        with pytest.raises(WriteError, match=f"cannot write the adapter to {out}: File too large"):
            save_adapter(peft_model, out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]

    (tmp_path / "a-file").write_text("in the way")
    with pytest.raises(WriteError, match=r"to .*a-file/adapter: .*a-file is a file, not a folder"):
        save_adapter(peft_model, tmp_path / "a-file" / "adapter")

