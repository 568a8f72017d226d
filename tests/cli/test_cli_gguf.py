"""`lora-studio export-gguf`: an adapter folder in, a .gguf file llama.cpp runs and an Ollama Modelfile out."""

from __future__ import annotations

import gguf
import pytest
import torch
from llama_cpp import Llama
from peft import LoraConfig, get_peft_model

from studio.cli import main
from studio.core.adapters.saving import save_adapter


@pytest.fixture()
def adapter_dir(fresh_default_model, tmp_path):
    torch.manual_seed(0)
    peft_model = get_peft_model(fresh_default_model.model,
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return save_adapter(peft_model, tmp_path / "adapter", base_model_spec="default")


def test_export_gguf_writes_a_file_llama_cpp_runs_and_a_modelfile(adapter_dir, tmp_path, capsys):
    out = tmp_path / "ollama" / "smol.gguf"
    code = main(["export-gguf", str(adapter_dir), "--base", "default", "--out", str(out), "--type", "f16"])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert out.is_file() and (out.parent / "Modelfile").read_text().startswith("FROM ./smol.gguf\n")
    assert f"GGUF file written to {out} (f16" in captured.out
    assert "llama.cpp check: next token agrees on" in captured.out and "tokenization matches" in captured.out
    llm = Llama(model_path=str(out), vocab_only=True, verbose=False)
    meta = dict(llm.metadata)
    llm.close()
    # the base came from a GGUF: its pre-tokenizer name travels into the export, as in the original file
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["general.file_type"] == str(gguf.LlamaFileType.MOSTLY_F16)


def test_bad_adapter_path_exits_2_with_one_line(tmp_path, capsys):
    code = main(["export-gguf", str(tmp_path / "nowhere"), "--base", "default", "--out", str(tmp_path / "x.gguf")])

    err = capsys.readouterr().err
    assert code == 2
    assert "no such adapter folder" in err and err.strip().count("\n") == 0
    assert list(tmp_path.iterdir()) == []
