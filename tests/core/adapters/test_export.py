from __future__ import annotations

import copy
import json
import resource
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open

from studio.core.adapters.folder import read_adapter_info
from studio.core.adapters.loading import load_adapter
from studio.core.adapters.merging import MergeProgress, merge_and_save
from studio.core.adapters.saving import save_adapter
from studio.core.errors import ExportError, WriteError
from studio.core.files import atomic_folder
from studio.core.model import inventory, plan

PROBE = "Write one sentence about adapters."


def _randomize_lora_b(peft_model: PeftModel, seed: int = 0) -> None:
    """PEFT starts B at zero (the adapter changes nothing); random B makes every check below measurable."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    peft_model.eval()


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _lora_modules(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


@pytest.fixture()
def adapted(fresh_default_model):
    """The default model with a q/v LoRA plan (rank 4) built through the studio's plan, B randomized."""
    tree = inventory.build(fresh_default_model.model)
    lora_plan = plan.LoraPlan(targets=tuple(inventory.select(tree, "q_proj,v_proj")), rank=4, alpha=8, dropout=0.0)
    peft_model = get_peft_model(fresh_default_model.model, plan.to_peft_config(lora_plan, tree))
    _randomize_lora_b(peft_model)
    return fresh_default_model, peft_model, plan.count(tree, lora_plan)


@pytest.fixture()
def probe(default_tokenizer):
    return default_tokenizer(PROBE, return_tensors="pt").input_ids


def _tiny_adapter(model, out: Path, **config) -> Path:
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **config))
    _randomize_lora_b(peft_model)
    return save_adapter(peft_model, out)


def test_saved_adapter_loads_in_plain_peft_with_equal_logits(default_model, adapted, probe, tmp_path):
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
    adapter_logits = _logits(peft_model, probe)
    assert (_logits(reloaded, probe) - adapter_logits).abs().max() < 1e-5
    assert (adapter_logits - _logits(default_model.model, probe)).abs().max() > 1e-2


def test_float32_merge_opens_with_auto_class_and_leaves_the_adapter_model_as_it_was(adapted, probe, tmp_path):
    from transformers import AutoModelForCausalLM

    loaded, peft_model, _ = adapted
    before = _logits(peft_model, probe)
    peft_model.train()
    events: list[MergeProgress] = []
    report = merge_and_save(peft_model, loaded.tokenizer, tmp_path / "merged", dtype="float32",
                            probe_input_ids=probe[0].tolist(), on_progress=events.append)

    assert report.dtype == "float32" and report.path == str(tmp_path / "merged")
    assert 0 < report.max_logit_diff < 1e-4 and report.saved_logit_diff == report.max_logit_diff
    assert [e.stage for e in events][0] == "merge" and events[-1].stage == "done" and events[-1].fraction == 1.0
    assert all(a.fraction <= b.fraction for a, b in zip(events, events[1:]))
    saved = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= saved
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temp folder left behind
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (_logits(merged, probe) - before).abs().max() < 1e-4

    assert peft_model.training  # the caller's train/eval mode is given back
    assert len(_lora_modules(peft_model)) == 60
    assert not any(peft_model.get_submodule(n).merged for n in _lora_modules(peft_model))
    peft_model.eval()
    assert torch.equal(_logits(peft_model, probe), before)


def test_bfloat16_merge_writes_bfloat16_weights_and_replaces_the_studios_earlier_folder(adapted, probe, tmp_path):
    loaded, peft_model, _ = adapted
    before = _logits(peft_model, probe)
    out = tmp_path / "merged"
    with atomic_folder(out, "merged model") as staging:
        (staging / "stale.txt").write_text("from an earlier merge")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a person's")
    with pytest.raises(WriteError, match="mine holds files the studio did not write"):  # refused before merging
        merge_and_save(peft_model, loaded.tokenizer, tmp_path / "mine", dtype="bfloat16")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    report = merge_and_save(peft_model, loaded.tokenizer, out, dtype="bfloat16")
    assert torch.equal(_logits(peft_model, probe), before)  # casting the copy left the caller's float32 weights

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
    _randomize_lora_b(peft_model)
    ids = torch.tensor([[5, 17, 99, 3, 42, 8]])
    report = merge_and_save(peft_model, None, tmp_path / "merged", probe_input_ids=ids)

    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and "quantization_config" not in config
    assert report.notes and "tied" in report.notes[0]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert report.max_logit_diff < 1e-5
    assert (_logits(merged, ids) - _logits(peft_model, ids)).abs().max() < 1e-5


def test_merging_into_a_4bit_base_is_refused_with_the_way_out(tiny_llama, tmp_path):
    from transformers import BitsAndBytesConfig

    tiny_llama.config.quantization_config = BitsAndBytesConfig(load_in_4bit=True)  # what a bnb 4-bit load carries
    peft_model = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=["q_proj"]))
    refusal = r"quantized base \(4-bit \(bitsandbytes\)\).*reopen the base without quantization"
    with pytest.raises(ExportError, match=refusal):
        merge_and_save(peft_model, None, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_loaded_adapter_matches_the_saved_one_and_can_continue_training(default_model, adapted, probe, tmp_path):
    _, peft_model, counts = adapted
    out = save_adapter(peft_model, tmp_path / "adapter")
    info = read_adapter_info(out)
    assert (info.r, info.alpha, info.variant, info.targets, info.task_type) == (
        4, 8.0, "lora", ("q_proj", "v_proj"), "CAUSAL_LM")
    assert info.modules == 60 and info.parameters == counts.lora == peft_model.get_nb_trainable_parameters()[0]
    assert info.file_bytes == (out / "adapter_model.safetensors").stat().st_size

    base = copy.copy(default_model)
    base.model = copy.deepcopy(default_model.model)
    loaded = load_adapter(base, out, trainable=True)
    assert (_logits(loaded, probe) - _logits(peft_model, probe)).abs().max() < 1e-5
    lora_params = [p for n, p in loaded.named_parameters() if "lora_" in n]
    assert len(lora_params) == 120 and all(p.requires_grad for p in lora_params)
    loaded.unload()
    frozen = load_adapter(base, out)
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if "lora_" in n)


def test_load_adapter_explains_a_missing_folder_or_a_folder_that_is_no_adapter(default_model, tmp_path):
    with pytest.raises(ExportError, match="no such adapter folder"):
        load_adapter(default_model, tmp_path / "nowhere")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an adapter")
    with pytest.raises(ExportError, match="not a PEFT adapter folder: it has no adapter_config.json"):
        load_adapter(default_model, tmp_path / "notes")
    (tmp_path / "notes" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ExportError, match="holds an adapter of type IA3, not LoRA"):
        read_adapter_info(tmp_path / "notes")
    (tmp_path / "notes" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ExportError, match="has no positive `r`"):
        read_adapter_info(tmp_path / "notes")
    (tmp_path / "notes" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    with pytest.raises(ExportError, match="has adapter_config.json but no adapter_model.safetensors"):
        read_adapter_info(tmp_path / "notes")
    (tmp_path / "notes" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ExportError, match="damaged or not a weights file"):
        read_adapter_info(tmp_path / "notes")
    assert not _lora_modules(default_model.model)


def test_adapter_from_another_model_is_refused_naming_module_and_shapes(fresh_default_model, tiny_llama, tmp_path):
    out = _tiny_adapter(tiny_llama, tmp_path / "tiny", r=4, target_modules=["q_proj", "v_proj"])
    expected = r"does not fit .*model\.layers\.0\.self_attn\.q_proj is 576→576 here.*lora_A\.weight for it is 4×64"
    with pytest.raises(ExportError, match=expected):
        load_adapter(fresh_default_model, out)
    assert not _lora_modules(fresh_default_model.model)  # refused before PEFT touched the model


def test_adapter_from_a_shallower_model_of_the_same_width_is_refused(fresh_default_model, tmp_path):
    from transformers import AutoModelForCausalLM

    # same layer shapes as SmolLM2 but 2 layers: every tensor fits, yet 28 layers' targets would get no weights
    config = copy.deepcopy(fresh_default_model.model.config)
    config.num_hidden_layers = 2
    shallow = AutoModelForCausalLM.from_config(config)
    out = _tiny_adapter(shallow, tmp_path / "shallow", r=4, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ExportError, match="targets match 60 modules here but it holds weights for 4"):
        load_adapter(fresh_default_model, out)
    assert not _lora_modules(fresh_default_model.model)  # the half-loaded adapter was taken off again


def test_read_adapter_info_names_the_variant(tiny_llama, tmp_path):
    out = _tiny_adapter(tiny_llama, tmp_path / "dora", r=2, lora_alpha=4, target_modules=["o_proj"], use_dora=True)
    info = read_adapter_info(out)
    assert (info.variant, info.r, info.alpha, info.targets, info.modules) == ("dora", 2, 4.0, ("o_proj",), 3)


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
    _randomize_lora_b(peft_model, seed=1)

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
