"""Loading a saved adapter onto an open model, after checking that it fits; one clear line when it does not."""

from __future__ import annotations

import copy
import json

import pytest

from studio.core.adapters.folder import read_adapter_info
from studio.core.adapters.loading import load_adapter
from studio.core.adapters.saving import save_adapter
from studio.core.errors import ExportError
from tests.core.adapters.lora_models import logits, lora_modules, tiny_adapter


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
    assert (logits(loaded, probe) - logits(peft_model, probe)).abs().max() < 1e-5
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
    assert not lora_modules(default_model.model)


def test_adapter_from_another_model_is_refused_naming_module_and_shapes(fresh_default_model, tiny_llama, tmp_path):
    out = tiny_adapter(tiny_llama, tmp_path / "tiny", r=4, target_modules=["q_proj", "v_proj"])
    expected = r"does not fit .*model\.layers\.0\.self_attn\.q_proj is 576→576 here.*lora_A\.weight for it is 4×64"
    with pytest.raises(ExportError, match=expected):
        load_adapter(fresh_default_model, out)
    assert not lora_modules(fresh_default_model.model)  # refused before PEFT touched the model


def test_adapter_from_a_shallower_model_of_the_same_width_is_refused(fresh_default_model, tmp_path):
    from transformers import AutoModelForCausalLM

    # same layer shapes as SmolLM2 but 2 layers: every tensor fits, yet 28 layers' targets would get no weights
    config = copy.deepcopy(fresh_default_model.model.config)
    config.num_hidden_layers = 2
    shallow = AutoModelForCausalLM.from_config(config)
    out = tiny_adapter(shallow, tmp_path / "shallow", r=4, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ExportError, match="targets match 60 modules here but it holds weights for 4"):
        load_adapter(fresh_default_model, out)
    assert not lora_modules(fresh_default_model.model)  # the half-loaded adapter was taken off again

