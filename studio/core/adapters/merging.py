"""Merge an adapter into its base and save one plain model folder, checked against the adapter on a probe batch.
The caller's model is left as it was (see `merge_and_save`)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from studio.core.errors import ExportError, first_line
from studio.core.files import atomic_folder, check_output_folder
from studio.core.progress import Progress, ProgressCallback, ignore, scaled

MergeDtype = Literal["float32", "bfloat16", "float16"]

MERGE_DTYPES = ("float32", "bfloat16", "float16")

PROBE_TEXT = "A merged model should answer exactly like the base model with its adapter on."


@dataclass(frozen=True)
class MergeReport:
    path: str
    max_logit_diff: float  # adapter-on vs merged, both in the adapter model's precision: checks the merge itself
    dtype: str
    seconds: float
    saved_logit_diff: float  # adapter-on vs the merged model as saved in `dtype` (adds its rounding, if narrower)
    notes: tuple[str, ...] = ()  # what the merge changed beyond adding the deltas, for the user to read


def merge_and_save(
    peft_model: Any,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    dtype: MergeDtype = "float32",
    probe_input_ids: Sequence[int] | Any | None = None,
    on_progress: ProgressCallback | None = None,
    force: bool = False,
) -> MergeReport:
    """Save base + adapter as one plain model folder (safetensors, config, generation config, tokenizer) that
    `AutoModelForCausalLM.from_pretrained(out_dir)` opens, and check it against the adapter on a probe batch.
    `out_dir` must be a folder the studio may write (files.check_output_folder; `force` writes beside a person's
    files, which stay): that is checked before the merge begins.

    The caller's PeftModel is left exactly as it was. Merging in place and unmerging afterwards would leave
    rounding drift in its base weights (large in bf16), and a deep copy of the whole model doubles memory on
    its device. Instead each adapted layer is copied on its own, merged there by PEFT, and moved to the CPU:
    the extra device memory is one layer, and the CPU holds the model that is being written anyway (sharing
    the unchanged tensors with a CPU base). The merge is checked in the base's precision, then cast to `dtype`.

    A 4-bit/8-bit base is refused: its weights are rounded, so a merged model would bake that rounding into
    the adapter's update; merge into the unquantized base instead.
    """
    started = time.perf_counter()
    report = on_progress or ignore
    if dtype not in MERGE_DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}: use {', '.join(MERGE_DTYPES)}")
    target = Path(out_dir).expanduser()
    check_output_folder(target, "merged model", force=force)
    hf_model = peft_model.get_base_model()
    quantized = quantization_of(hf_model)
    if quantized:
        raise ExportError(
            f"cannot merge into a quantized base ({quantized}): the merged weights would carry its rounding error; "
            "save the adapter, reopen the base without quantization (e.g. bfloat16) and merge there"
        )
    import torch

    report(Progress("merge", 0.0, "Merging the adapter into a copy of the base weights"))
    merged, notes = merged_model(hf_model, scaled(report, 0.0, 0.7))
    report(Progress("verify", 0.75, "Comparing the merged model with the adapter on a probe batch"))
    probe = _probe_ids(probe_input_ids, tokenizer, hf_model)
    expected = _adapter_logits(peft_model, probe)
    diff = saved_diff = _max_logit_diff(expected, merged, probe)
    if any(t.is_floating_point() and t.dtype != getattr(torch, dtype) for t in merged.state_dict().values()):
        merged.to(getattr(torch, dtype))  # replaces the copy's tensors; the caller's weights stay untouched
        saved_diff = _max_logit_diff(expected, merged, probe)
    report(Progress("save", 0.85, f"Writing the merged model to {target}"))
    with atomic_folder(target, "merged model", force=force) as staging:
        merged.save_pretrained(str(staging))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    report(Progress("done", 1.0, f"Merged model saved to {target}"))
    return MergeReport(str(target), diff, dtype, time.perf_counter() - started, saved_diff, notes)


def quantization_of(hf_model: Any) -> str | None:
    """How the base's weights are quantized, or None for plain float weights. GGUF counts as plain: transformers
    de-quantizes GGUF weights to floats when it loads them."""
    qconfig = getattr(hf_model.config, "quantization_config", None)
    if qconfig is not None:
        get = qconfig.get if isinstance(qconfig, dict) else lambda key: getattr(qconfig, key, None)
        method = str(getattr(get("quant_method"), "value", get("quant_method")) or "")
        if get("load_in_4bit"):
            return "4-bit (bitsandbytes)"
        if get("load_in_8bit"):
            return "8-bit (bitsandbytes)"
        if method and method != "gguf":
            return method
    held = {type(param).__name__ for param in hf_model.parameters()}
    if "Params4bit" in held:
        return "4-bit (bitsandbytes)"
    if "Int8Params" in held:
        return "8-bit (bitsandbytes)"
    return None


def merged_model(hf_model: Any, report: ProgressCallback) -> tuple[Any, tuple[str, ...]]:
    """A plain copy of the base architecture on the CPU, in the base's own dtypes, holding base + adapter weights.
    Tensors the adapter does not change share memory with the base when it is on the CPU already. `report` hears
    one stage, "merge", from 0 to 1 as the adapted layers are merged."""
    import torch
    from transformers.initialization import no_init_weights

    wrappers = _adapter_wrappers(hf_model)
    tensors: dict[str, Any] = {}
    for i, (name, wrapper) in enumerate(wrappers.items()):
        merged = _merged_module(name, wrapper)
        for key, value in [*merged.named_parameters(), *merged.named_buffers()]:
            tensors[f"{name}.{key}"] = value.detach().to("cpu")
        del merged
        report(Progress("merge", (i + 1) / len(wrappers), f"Merged {name}"))

    config = copy.deepcopy(hf_model.config)
    # the merged weights are plain floats: a quantization_config (e.g. a GGUF one) would make transformers
    # load them as quantized ones
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    notes: list[str] = []
    embeddings = (hf_model.get_input_embeddings(), hf_model.get_output_embeddings())
    if getattr(config, "tie_word_embeddings", False) and any(m in wrappers.values() for m in embeddings):
        # the adapter changes one side of the tied embedding matrix only: the merged model needs both matrices
        config.tie_word_embeddings = False
        notes.append("the input and output embeddings were tied; the adapter changed one of them, so both are saved")
    with torch.device("meta"), no_init_weights():
        merged_model = type(hf_model)(config)
    for name, _ in [*merged_model.named_parameters(remove_duplicate=False),
                    *merged_model.named_buffers(remove_duplicate=False)]:
        value = tensors.get(name)
        if value is None:
            value = _tensor_at(hf_model, name).detach().to("cpu")
        owner_name, _, attr = name.rpartition(".")
        owner = merged_model.get_submodule(owner_name)
        if attr in owner._parameters:
            value = torch.nn.Parameter(value, requires_grad=False)
        setattr(owner, attr, value)
    merged_model.tie_weights()
    if merged_model.can_generate() and getattr(hf_model, "generation_config", None) is not None:
        merged_model.generation_config = copy.deepcopy(hf_model.generation_config)
    merged_model.eval()
    return merged_model, tuple(notes)


def _adapter_wrappers(hf_model: Any) -> dict[str, Any]:
    """The outermost modules PEFT put into the model (LoRA layers, modules_to_save copies), by name."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    found: dict[str, Any] = {}
    for name, module in hf_model.named_modules():
        inside = any(name.startswith(outer + ".") for outer in found)
        if not inside and isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            found[name] = module
    return found


def _merged_module(name: str, wrapper: Any) -> Any:
    """A merged copy of one PEFT wrapper, merged by PEFT's own code (as its merge_and_unload does)."""
    clone = copy.deepcopy(wrapper)
    try:
        if hasattr(clone, "unload_and_optionally_merge_module"):
            return clone.unload_and_optionally_merge_module(merge=True, safe_merge=True, adapter_names=None)
        clone.merge(safe_merge=True)
    except ValueError as exc:  # safe_merge found NaN/inf in the merged weights
        raise ExportError(f"cannot merge {name}: {first_line(exc)}") from exc
    return clone.get_base_layer()


def _tensor_at(model: Any, name: str) -> Any:
    owner_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner_name), attr)


def _probe_ids(probe_input_ids: Sequence[int] | Any | None, tokenizer: Any, hf_model: Any) -> Any:
    import torch

    if probe_input_ids is None and tokenizer is not None:
        return tokenizer(PROBE_TEXT, return_tensors="pt").input_ids
    if probe_input_ids is None:
        vocab = int(hf_model.get_input_embeddings().weight.shape[0])
        return torch.arange(1, 17).remainder(vocab).unsqueeze(0)
    ids = torch.as_tensor(probe_input_ids, dtype=torch.long)
    return ids.unsqueeze(0) if ids.dim() == 1 else ids


def _adapter_logits(peft_model: Any, input_ids: Any) -> Any:
    """The caller's model's float32 logits on the CPU, computed in eval mode (no dropout); each module gets its own
    train/eval mode back afterwards."""
    import torch

    modes = [(module, module.training) for module in peft_model.modules()]
    device = next(peft_model.parameters()).device
    try:
        peft_model.eval()
        with torch.inference_mode():
            return peft_model(input_ids=input_ids.to(device)).logits.float().cpu()
    finally:
        for module, mode in modes:
            module.training = mode


def _max_logit_diff(expected: Any, merged_model: Any, input_ids: Any) -> float:
    import torch

    with torch.inference_mode():
        return float((expected - merged_model(input_ids=input_ids).logits.float()).abs().max())
