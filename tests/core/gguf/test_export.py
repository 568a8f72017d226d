"""GGUF export: the written file runs in llama.cpp (llama-cpp-python) and in transformers' GGUF reader with the
logits of the merged torch model. Each tolerance below is 5-15× what was measured on the default model."""

from __future__ import annotations

import copy
import resource
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from studio.core.adapters.merging import merged_model
from studio.core.errors import ExportError, WriteError
from studio.core.files import MANIFEST
from studio.core.gguf.export import export_gguf
from studio.core.gguf.modelfile import modelfile_text

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomize_lora_b(peft_model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    peft_model.eval()


@pytest.fixture(scope="module")
def adapted(default_model):
    """The default model with a rank-4 LoRA on every linear layer, B random: the merge changes the logits by ~2.7."""
    torch.manual_seed(0)  # PEFT draws lora_A from the global generator
    peft_model = get_peft_model(copy.deepcopy(default_model.model),
                                LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, lora_dropout=0.0))
    _randomize_lora_b(peft_model)
    return peft_model


@pytest.fixture(scope="module")
def probe_ids(default_tokenizer):
    text = default_tokenizer.apply_chat_template([{"role": "user", "content": "Name three rivers in Europe."}],
                                                 tokenize=False, add_generation_prompt=True)
    return default_tokenizer(text, add_special_tokens=False).input_ids


def _torch_logits(model, ids) -> np.ndarray:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def _llama_cpp_logits(path, ids) -> np.ndarray:
    from llama_cpp import GGML_TYPE_F32, Llama

    llm = Llama(model_path=str(path), logits_all=True, n_ctx=128, n_batch=128, type_k=GGML_TYPE_F32,
                type_v=GGML_TYPE_F32, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def _metadata(path) -> dict[str, str]:
    """The file's key/values as llama.cpp reads them (gguf.GGUFReader takes 5 s over a 49k-token vocabulary)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return dict(llm.metadata)
    finally:
        llm.close()


def test_f32_export_runs_in_llama_cpp_with_the_merged_logits(adapted, default_model, default_tokenizer, probe_ids,
                                                             tmp_path):
    events = []
    report = export_gguf(adapted, default_tokenizer, tmp_path / "smol.gguf", "f32", on_progress=events.append)

    path = tmp_path / "smol.gguf"
    assert report.path == str(path) and report.bytes == path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "Modelfile", "smol.gguf"]  # no temp file left
    # measured 8e-5: an f32 file is the torch model, up to float32 summation order
    assert report.verified and report.top1_all_agree and report.tokens_agree
    assert report.max_logit_diff < 1e-3 and report.probe_tokens > 30
    assert [e.stage for e in events][0] == "merge" and events[-1].stage == "done"
    assert all(a.fraction <= b.fraction for a, b in zip(events, events[1:]))
    merged, _ = merged_model(adapted.get_base_model(), lambda _p: None)
    weights = {k: t for k, t in merged.state_dict().items() if k != "lm_head.weight"}  # tied: no output matrix
    assert report.tensors == len(weights) == 272
    assert report.bytes > 4 * sum(t.numel() for t in weights.values())

    # the adapter is in the file: on another prompt too, llama.cpp follows the merged model, not the base
    llama = _llama_cpp_logits(path, probe_ids)
    assert np.abs(llama - _torch_logits(merged, probe_ids)).max() < 1e-3
    assert np.abs(llama - _torch_logits(default_model.model, probe_ids)).max() > 1.0

    meta = _metadata(path)
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == str(gguf.LlamaFileType.ALL_F32)
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == ("9", "3")
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.chat_template"] == default_tokenizer.chat_template
    assert meta["tokenizer.ggml.eos_token_id"] == str(default_tokenizer.eos_token_id)


def test_f16_export_agrees_in_llama_cpp_and_in_transformers(adapted, probe_ids, default_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    report = export_gguf(adapted, default_tokenizer, tmp_path / "smol.gguf", "f16")

    assert report.out_type == "f16" and report.verified and report.top1_all_agree and report.tokens_agree
    assert report.max_logit_diff < 0.5  # measured 0.09: f16 weights and llama.cpp's f16 matrix products
    # a second, independent reader: transformers de-permutes q/k and rebuilds the tied model from the file
    reread = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="smol.gguf", dtype=torch.float32)
    merged, _ = merged_model(adapted.get_base_model(), lambda _p: None)
    expected, got = _torch_logits(merged, probe_ids), _torch_logits(reread, probe_ids)
    assert np.abs(got - expected).max() < 0.2  # measured 0.034: f16 rounding of the weights only (f32 file: 0.0)
    assert (got.argmax(-1) == expected.argmax(-1)).all()


@pytest.mark.parametrize("out_type, file_type, min_top1, size_limit", [
    ("q8_0", gguf.LlamaFileType.MOSTLY_Q8_0, 0.85, 150e6),  # 8.5 bits a weight: about half the f16 file (271 MB)
    ("bf16", gguf.LlamaFileType.MOSTLY_BF16, 0.9, 272e6),
])
def test_narrow_types_run_and_mostly_agree(adapted, default_tokenizer, tmp_path, out_type, file_type, min_top1,
                                           size_limit):
    report = export_gguf(adapted, default_tokenizer, tmp_path / "smol.gguf", out_type)

    # measured top-1 agreement 60/64 (q8_0) and 64/64 (bf16); max logit differences 3.1 and 0.5. A bf16 file
    # read as f16 (or q8_0 blocks in the wrong layout) would give noise, not this agreement.
    assert report.verified and report.top1_agreement >= min_top1
    assert _metadata(report.path)["general.file_type"] == str(file_type)
    assert report.bytes < size_limit


@pytest.mark.parametrize("config_class, extra", [
    ("LlamaConfig", {"tie_word_embeddings": False, "attention_bias": True, "head_dim": 24}),
    ("Qwen2Config", {"tie_word_embeddings": True}),
    ("MistralConfig", {"tie_word_embeddings": False, "sliding_window": None}),
])
def test_other_llama_family_layouts_run_in_llama_cpp(default_tokenizer, tmp_path, config_class, extra):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_class)(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(default_tokenizer), max_position_embeddings=256, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if extra.get("attention_bias") or config_class == "Qwen2Config":
        with torch.no_grad():  # random biases, so a q/k bias left in the wrong order would show
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.5)

    report = export_gguf(model, default_tokenizer, tmp_path / "tiny.gguf", "f32")

    assert report.verified and report.top1_all_agree and report.max_logit_diff < 1e-3
    assert report.tensors == len(model.state_dict()) - extra["tie_word_embeddings"]  # an output matrix when untied


@pytest.mark.parametrize("digits, expected", [(r"\p{N}", "qwen2"), (r"\p{N}{1,3}", "llama-bpe")])
def test_qwen2_and_llama3_split_rules_get_llama_cpp_names_that_tokenize_alike(tiny_chat_model, default_tokenizer,
                                                                            tmp_path, digits, expected):
    from tokenizers import Regex, pre_tokenizers

    words = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
    rest = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    tokenizer = copy.deepcopy(default_tokenizer)  # the default vocabulary, split as Qwen2 / Llama 3 split text
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(words + digits + rest), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    report = export_gguf(tiny_chat_model, tokenizer, tmp_path / "tiny.gguf", "f32")
    assert _metadata(report.path)["tokenizer.ggml.pre"] == expected and report.tokens_agree
    # the probe tells split rules apart: GPT-2's rule keeps "\n\n  " together where these do not
    forced = export_gguf(tiny_chat_model, tokenizer, tmp_path / "gpt2.gguf", "f32", tokenizer_pre="gpt-2")
    assert forced.tokens_agree is False


def test_unsupported_architecture_is_one_line_naming_what_is_supported(default_tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=len(default_tokenizer)))
    with pytest.raises(ExportError) as caught:
        export_gguf(model, default_tokenizer, tmp_path / "gpt2.gguf", "f16")
    message = str(caught.value)
    assert "\n" not in message and "GPT2LMHeadModel" in message and "LlamaForCausalLM" in message
    assert list(tmp_path.iterdir()) == []


def test_quantized_or_weightless_base_and_unknown_type_are_refused(tiny_llama, default_tokenizer, tmp_path):
    from transformers import BitsAndBytesConfig

    with pytest.raises(ExportError, match="unknown GGUF type 'q4_k': use f32, f16, bf16, q8_0"):
        export_gguf(tiny_llama, default_tokenizer, tmp_path / "x.gguf", "q4_k")
    with pytest.raises(ExportError, match="plan mode"):
        export_gguf(copy.deepcopy(tiny_llama).to("meta"), default_tokenizer, tmp_path / "x.gguf", "f16")
    tiny_llama.config.quantization_config = BitsAndBytesConfig(load_in_4bit=True)
    with pytest.raises(ExportError, match=r"quantized base \(4-bit \(bitsandbytes\)\).*without quantization"):
        export_gguf(tiny_llama, default_tokenizer, tmp_path / "x.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture()
def tiny_chat_model(default_tokenizer):
    """A random 2-layer llama over the default tokenizer: exports in a fraction of a second."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(default_tokenizer), tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config)


def test_without_llama_cpp_the_file_is_written_and_the_report_says_unchecked(tiny_chat_model, default_tokenizer,
                                                                             tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what an environment without llama-cpp-python gives
    report = export_gguf(tiny_chat_model, default_tokenizer, tmp_path / "tiny.gguf", "f16")

    assert not report.verified and report.max_logit_diff is None and report.top1_agreement is None
    assert any("llama-cpp-python is not installed" in note for note in report.notes)
    assert (tmp_path / "tiny.gguf").stat().st_size == report.bytes


def test_failed_write_keeps_the_earlier_file_and_leaves_no_temp_file(tiny_chat_model, default_tokenizer, tmp_path):
    target = tmp_path / "tiny.gguf"
    export_gguf(tiny_chat_model, default_tokenizer, target, "f32")
    before = target.read_bytes()

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # the OS refuses files past 1 MiB, as a full disk
    try:
        with pytest.raises(WriteError, match=f"cannot write the GGUF file to {target}: File too large"):
            export_gguf(tiny_chat_model, default_tokenizer, target, "f16")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "Modelfile", "tiny.gguf"]

    (tmp_path / "a-file").write_text("in the way")
    with pytest.raises(WriteError, match="a-file is a file, not a folder"):
        export_gguf(tiny_chat_model, default_tokenizer, tmp_path / "a-file" / "x.gguf", "f16")


def test_a_persons_gguf_file_is_replaced_only_with_force_and_their_modelfile_never(tiny_chat_model,
                                                                                  default_tokenizer, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # the check in llama.cpp is not what this is about
    target = tmp_path / "dates.gguf"
    target.write_bytes(b"a person's model")
    (tmp_path / "Modelfile").write_text("FROM ./llama3.gguf\n# a person's\n")
    with pytest.raises(WriteError, match=f"{target} exists and was not written by the studio: .*--force"):
        export_gguf(tiny_chat_model, default_tokenizer, target, "f16")
    assert target.read_bytes() == b"a person's model"

    report = export_gguf(tiny_chat_model, default_tokenizer, target, "f16", force=True)
    assert target.read_bytes()[:4] == b"GGUF"
    assert (tmp_path / "Modelfile").read_text() == "FROM ./llama3.gguf\n# a person's\n"
    assert report.modelfile == str(tmp_path / "dates.Modelfile")
    assert Path(report.modelfile).read_text().startswith("FROM ./dates.gguf\n")

    again = export_gguf(tiny_chat_model, default_tokenizer, target, "f32")  # the studio's own now: no force
    other = export_gguf(tiny_chat_model, default_tokenizer, tmp_path / "other.gguf", "f16")
    assert again.modelfile == report.modelfile and Path(other.modelfile).name == "other.Modelfile"
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "Modelfile", "dates.Modelfile", "dates.gguf",
                                                          "other.Modelfile", "other.gguf"]


def test_modelfile_has_a_chatml_template_only_for_a_chatml_model(default_tokenizer):
    text = modelfile_text("smol.gguf", default_tokenizer)
    lines = text.splitlines()
    assert lines[0] == "FROM ./smol.gguf"
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in lines
    assert any(line.startswith('TEMPLATE """') for line in lines) and "<|im_start|>assistant\n" in text
    assert 'PARAMETER stop "<|im_end|>"' in lines

    other = copy.copy(default_tokenizer)
    other.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    text = modelfile_text("smol.gguf", other)
    directives = [line.split()[0] for line in text.splitlines() if line and not line.startswith("#")]
    assert directives == ["FROM", "PARAMETER"] and "add a" in text
    assert 'PARAMETER stop "<|im_end|>"' in text.splitlines()  # the eos token still ends a reply


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _tiny_llama_with_rope(tokenizer, rope: dict, config_class: str = "LlamaConfig"):
    """head_dim 16: 8 frequencies, with wavelengths 6 to 20,000 positions. With Llama 3.1's rope scaled to an original
    context of 64, the first keeps its speed, the next two fall in the blended band, the rest run 8× slower, so the
    rotations differ well within the 64-token probe. Weights drawn at 0.1 (not 0.02) so attention depends on them."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_class)(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.1,
        rope_parameters=rope)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_llama3_rope_scaling_is_written_as_llama_cpp_frequency_factors(default_tokenizer, tmp_path):
    from studio.core.gguf.export import _probe

    scaled = _tiny_llama_with_rope(default_tokenizer, LLAMA3_ROPE)
    plain = _tiny_llama_with_rope(default_tokenizer, {"rope_type": "default", "rope_theta": 10000.0})
    _, ids = _probe(default_tokenizer)
    # the same weights: the scaling alone moves the logits by 3.1 and the top-1 token at 33 of 64 positions
    scaled_logits, plain_logits = _torch_logits(scaled, ids), _torch_logits(plain, ids)
    assert np.abs(scaled_logits - plain_logits).max() > 1.0
    assert (scaled_logits.argmax(-1) != plain_logits.argmax(-1)).mean() > 0.25

    report = export_gguf(scaled, default_tokenizer, tmp_path / "llama3.gguf", "f32")

    # measured 3.2e-6 (an f32 file); a file without the factors would be off by the 3.1 above
    assert report.verified and report.top1_all_agree and report.probe_tokens == len(ids) == 64
    assert report.max_logit_diff < 1e-3
    assert report.tensors == len(scaled.state_dict())  # the tied output matrix left out, rope_freqs added


def test_llama3_frequency_factors_match_transformers_from_either_config_spelling():
    from types import SimpleNamespace

    import transformers

    from studio.core.gguf.layout import hparams as layout_hparams

    rope = {**LLAMA3_ROPE, "rope_theta": 500000.0}
    shape = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1, "num_attention_heads": 4,
             "max_position_embeddings": 1024}
    # transformers' own inverse frequencies, plain over scaled: the divisors llama.cpp applies
    scaled, plain = (transformers.LlamaModel(transformers.LlamaConfig(**shape, rope_parameters=r)).rotary_emb.inv_freq
                     for r in (rope, {"rope_type": "default", "rope_theta": 500000.0}))
    expected = (plain / scaled).tolist()
    assert expected[0] == 1.0 and expected[-1] == 8.0 and any(1.0 < e < 8.0 for e in expected)  # all three bands

    v5 = transformers.LlamaConfig(**shape, rope_parameters=rope)
    v4 = SimpleNamespace(**shape, vocab_size=128, rms_norm_eps=1e-5, rope_theta=500000.0,  # 4.x: theta outside
                         rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"})
    for config in (v5, v4):
        hparams = layout_hparams(config, gguf.MODEL_ARCH.LLAMA)
        assert hparams["rope_theta"] == 500000.0 and hparams["rope_linear_factor"] is None
        assert np.allclose(hparams["rope_freq_factors"], expected, rtol=1e-5)


@pytest.mark.parametrize("config_class, rope, message", [
    ("LlamaConfig", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
     "does not support 'yarn' rope scaling yet: only none, linear or llama3"),
    ("LlamaConfig", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
     "does not support 'dynamic' rope scaling yet: only none, linear or llama3"),
    ("Qwen2Config", LLAMA3_ROPE, "llama3 rope scaling for the llama architecture only, not qwen2"),
])
def test_unsupported_rope_scaling_is_refused_naming_it(default_tokenizer, tmp_path, config_class, rope, message):
    model = _tiny_llama_with_rope(default_tokenizer, rope, config_class)
    with pytest.raises(ExportError, match=message) as caught:
        export_gguf(model, default_tokenizer, tmp_path / "x.gguf", "f32")
    assert "\n" not in str(caught.value) and list(tmp_path.iterdir()) == []
