"""Write base + adapter, merged, as one GGUF file that llama.cpp and Ollama run, with an Ollama Modelfile beside it.

The weights are laid out as llama.cpp's own converter lays out the llama family (layout.py: tensor names,
the hyperparameters under `<arch>.*`, q/k rows reordered for llama.cpp's rotary layout) and the tokenizer goes
under `tokenizer.ggml.*` (vocab.py).

The file is written under a temp name beside the target, tensor by tensor (beyond the merged weights, memory
holds one converted tensor at a time), then opened by llama.cpp itself (when llama-cpp-python is installed) and
compared with the torch model on a probe prompt, and only then renamed into place (files.output_file: an existing
file is replaced only where the studio wrote it, or when forced).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from studio.core.adapters.folder import read_adapter_info
from studio.core.adapters.loading import load_adapter
from studio.core.adapters.merging import merged_model, quantization_of
from studio.core.data.formats import chat_prompt
from studio.core.errors import DataError, ExportError, first_line
from studio.core.files import check_output_file, output_file
from studio.core.gguf import layout as gguf_layout
from studio.core.gguf.modelfile import modelfile_path, write_modelfile
from studio.core.gguf.vocab import GgufVocab, gguf_vocab, source_tokenizer_pre
from studio.core.progress import Progress, ProgressCallback, ignore, scaled

GgufType = Literal["f32", "f16", "bf16", "q8_0"]
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
# digits, contractions, runs of spaces and newlines: where pre-tokenizers differ
PROBE_MESSAGE = "Does the merged model answer like its adapter? It's 1234567 tokens, isn't it?\n\n  Yes: 3.14."


@dataclass(frozen=True)
class GgufReport:
    path: str
    modelfile: str
    out_type: str
    bytes: int
    tensors: int
    seconds: float  # merge + write + check
    verified: bool  # llama.cpp opened the file and ran the probe
    max_logit_diff: float | None  # llama.cpp vs the torch model (float32 logits) on every probe position
    top1_agreement: float | None  # share of probe positions where both pick the same next token
    tokens_agree: bool | None  # llama.cpp tokenizes the probe text exactly as the model's tokenizer does
    probe_tokens: int
    notes: tuple[str, ...] = field(default=())

    @property
    def top1_all_agree(self) -> bool:
        return self.top1_agreement == 1.0


@dataclass(frozen=True)
class _Check:
    verified: bool
    max_logit_diff: float | None = None
    top1_agreement: float | None = None
    tokens_agree: bool | None = None
    note: str | None = None


# ---- entry points --------------------------------------------------------------------------------------------

def export_adapter_gguf(
    adapter_dir: str | Path,
    base: str,
    out_path: str | Path,
    out_type: GgufType = "f16",
    *,
    on_progress: ProgressCallback | None = None,
    force: bool = False,
) -> GgufReport:
    """Open `base` (a model spec, as `open_model` takes), put the adapter on it and export the merge to `out_path`.
    Progress covers the whole job: opening the base is its first fifth, the export (export_gguf) the rest."""
    from studio.core.model.loading import open_model

    read_adapter_info(adapter_dir)  # a wrong folder or target fails now, not after the base model has loaded
    _check_out_type(out_type)
    _target_file(out_path, force)
    loaded = open_model(base, on_progress=scaled(on_progress, 0.0, 0.2, stage="open"))
    peft_model = load_adapter(loaded, adapter_dir)
    source = loaded.source
    pre = source_tokenizer_pre(Path(source.location) / source.gguf_file) if source.gguf_file else None
    return export_gguf(
        peft_model, loaded.tokenizer, out_path, out_type, tokenizer_pre=pre, force=force,
        on_progress=scaled(on_progress, 0.2, 1.0),
    )


def export_gguf(
    model: Any,
    tokenizer: Any,
    out_path: str | Path,
    out_type: GgufType = "f16",
    *,
    on_progress: ProgressCallback | None = None,
    tokenizer_pre: str | None = None,
    force: bool = False,
) -> GgufReport:
    """Write `model` (a PeftModel, merged here on a copy, or a plain transformers model) and its tokenizer as one
    GGUF file of `out_type`, plus an Ollama Modelfile in the same folder. The caller's model is left as it was.
    An existing `out_path` is replaced only where the studio wrote it, or with `force`; the Modelfile never
    replaces a person's (modelfile.modelfile_path).

    `tokenizer_pre` names llama.cpp's pre-tokenizer; by default it is read off the tokenizer's own pre-tokenizer.
    """
    started = time.perf_counter()
    report = on_progress or ignore
    _check_out_type(out_type)
    if tokenizer is None:
        raise ExportError("GGUF export needs the model's tokenizer: the file carries the vocabulary")
    hf_model = model.get_base_model() if _is_peft(model) else model
    arch = _gguf_arch(hf_model)
    if next(hf_model.parameters()).device.type == "meta":
        raise ExportError("the model is open in plan mode (no weights): open it with its weights to export it")
    quantized = quantization_of(hf_model)
    if quantized:
        raise ExportError(
            f"cannot export a quantized base ({quantized}) to GGUF: the weights would carry its rounding error; "
            "reopen the base without quantization (e.g. bfloat16) and export from there"
        )
    target = _target_file(out_path, force)
    hparams = gguf_layout.hparams(hf_model.config, arch)
    vocab = gguf_vocab(tokenizer, hparams["vocab"], tokenizer_pre)

    report(Progress("merge", 0.0, "Merging the adapter into a copy of the base weights"))
    merged, merge_notes = merged_model(hf_model, scaled(report, 0.0, 0.3))
    plan = gguf_layout.tensor_plan(merged, arch, out_type, hparams)
    notes = [*merge_notes, *vocab.notes, *hparams["notes"]]
    with output_file(target, "GGUF file", force=force) as staging:
        _write(staging, target.stem, arch, out_type, hparams, vocab, plan, scaled(report, 0.3, 0.9))
        report(Progress("verify", 0.9, "Running the file in llama.cpp and comparing its logits"))
        text, ids = _probe(tokenizer)
        check = _verify(staging, merged, text, ids)
    if check.note:
        notes.append(check.note)
    modelfile = write_modelfile(target, tokenizer)
    report(Progress("done", 1.0, f"GGUF file written to {target}"))
    return GgufReport(
        str(target), str(modelfile), out_type, target.stat().st_size, len(plan), time.perf_counter() - started,
        check.verified, check.max_logit_diff, check.top1_agreement, check.tokens_agree, len(ids), tuple(notes),
    )


def _check_out_type(out_type: str) -> None:
    if out_type not in GGUF_TYPES:
        raise ExportError(f"unknown GGUF type {out_type!r}: use {', '.join(GGUF_TYPES)}")


def _is_peft(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _gguf_arch(hf_model: Any) -> Any:
    import gguf

    name = type(hf_model).__name__
    arch = ARCHITECTURES.get(name)
    if arch is None:
        raise ExportError(f"GGUF export does not support {name}: it writes {', '.join(ARCHITECTURES)} models")
    return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)


def _target_file(out_path: str | Path, force: bool) -> Path:
    """The GGUF file to write, once it is known that it and its Modelfile may be written."""
    target = Path(out_path).expanduser()
    if target.is_dir():
        raise ExportError(f"{target} is a folder: give the file to write, e.g. {target / 'model.gguf'}")
    check_output_file(target, "GGUF file", force=force)
    modelfile_path(target)
    return target


def _write(path: Path, name: str, arch: Any, out_type: str, hparams: dict[str, Any], vocab: GgufVocab,
           plan: list[tuple[str, Any, Any]], report: ProgressCallback) -> None:
    """The GGUF file at `path`; `report` hears one stage, "write", from 0 to 1 tensor by tensor."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_vocab_size(hparams["vocab"])
        writer.add_context_length(hparams["context"])
        writer.add_embedding_length(hparams["embedding"])
        writer.add_block_count(hparams["blocks"])
        writer.add_feed_forward_length(hparams["feed_forward"])
        writer.add_head_count(hparams["heads"])
        writer.add_head_count_kv(hparams["kv_heads"])
        writer.add_rope_dimension_count(hparams["head_dim"])
        if hparams["head_dim"] != hparams["embedding"] // hparams["heads"]:
            writer.add_key_length(hparams["head_dim"])
            writer.add_value_length(hparams["head_dim"])
        writer.add_rope_freq_base(hparams["rope_theta"])
        if hparams["rope_linear_factor"] is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(hparams["rope_linear_factor"])
        writer.add_layer_norm_rms_eps(hparams["rms_eps"])
        file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
        writer.add_file_type(gguf.LlamaFileType[file_types[out_type]])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.types)
        writer.add_token_merges(vocab.merges)
        for key, token_id in vocab.special.items():
            if token_id is not None:
                getattr(writer, f"add_{key}_token_id")(int(token_id))
        writer.add_add_bos_token(vocab.add_bos)
        if vocab.chat_template:
            writer.add_chat_template(vocab.chat_template)

        # declare every tensor first, then stream them: one converted tensor in memory at a time
        for gguf_name, tensor, qtype in plan:
            count = tensor.numel()
            block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            writer.add_tensor_info(gguf_name, tuple(tensor.shape), np.dtype(np.float32),
                                   count // block * block_bytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, (gguf_name, tensor, qtype) in enumerate(plan):
            writer.write_tensor_data(gguf_layout.tensor_array(gguf_name, tensor, qtype, arch, hparams))
            report(Progress("write", (i + 1) / len(plan),
                            f"Wrote tensor {i + 1} of {len(plan)}: {gguf_name} ({qtype.name})"))
    finally:
        writer.close()


# ---- checking the written file -------------------------------------------------------------------------------

def _probe(tokenizer: Any) -> tuple[str, list[int]]:
    """A chat-formatted prompt when the model has a chat template (its special tokens get checked too)."""
    try:
        text = chat_prompt(tokenizer, PROBE_MESSAGE) or PROBE_MESSAGE
    except DataError:  # a template that wants other roles: the plain message still checks the vocabulary
        text = PROBE_MESSAGE
    return text, list(tokenizer(text, add_special_tokens=False).input_ids)


def _verify(path: Path, merged: Any, text: str, ids: list[int]) -> _Check:
    """Run the probe through llama.cpp and through the torch model; compare the logits at every position."""
    try:
        from llama_cpp import GGML_TYPE_F32, Llama
    except (ImportError, OSError, RuntimeError):  # not installed, or its shared library does not load here
        return _Check(False, note="llama-cpp-python is not installed: the file was written but not run in llama.cpp")
    import numpy as np
    import torch

    try:
        # an f32 KV cache: llama.cpp's default f16 one adds its own rounding (0.04 on the default model's logits),
        # which is a run-time choice, not part of the file being checked
        llm = Llama(model_path=str(path), logits_all=True, n_ctx=max(64, len(ids)), n_batch=max(64, len(ids)),
                    n_threads=os.cpu_count(), type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)
    except (ValueError, RuntimeError) as exc:
        raise ExportError(f"llama.cpp cannot open the written file: {first_line(exc)}") from exc
    try:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float32)
        tokens_agree = llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    finally:
        llm.close()
    with torch.inference_mode():
        expected = merged(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    top1 = float(np.mean(got.argmax(-1) == expected.argmax(-1)))
    return _Check(True, float(np.abs(got - expected).max()), top1, tokens_agree)
