"""Adapters in and out of the studio: save a PEFT adapter, describe and load one, merge one into its base.

Every folder is written into a temp folder next to its target and renamed into place only when complete; an
earlier folder at the target is swapped out only then, so a failed save (disk full, no permission) leaves it
as it was and leaves no temp folder behind.
"""

from __future__ import annotations

import copy
import errno
import math
import re
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

from studio.core.adapter_folder import ADAPTER_CONFIG, read_adapter_config
from studio.core.errors import ExportError, StudioError, first_line
from studio.core.models import LoadedModel, require_weights, resolve_source
from studio.core.plan import Variant

MergeDtype = Literal["float32", "bfloat16", "float16"]
MERGE_DTYPES = ("float32", "bfloat16", "float16")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's file names, preferred first
PEFT_KEY_PREFIX = "base_model.model."  # PEFT's prefix on every tensor key of a transformers model's adapter
PEFT_TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "seq-cls"}
PROBE_TEXT = "A merged model should answer exactly like the base model with its adapter on."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<role>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter folder holds, read without loading any model."""

    path: str
    base_model: str | None  # base_model_name_or_path as written by whoever saved it
    targets: tuple[str, ...]  # target_modules: names, or one regular expression
    r: int
    alpha: float
    variant: Variant
    task_type: str | None  # PEFT's name, e.g. CAUSAL_LM
    modules: int  # adapted modules in the weights file
    parameters: int  # elements in the weights file
    file_bytes: int
    modules_to_save: tuple[str, ...]


@dataclass(frozen=True)
class MergeProgress:
    """A merge stage: `fraction` runs from 0 to 1."""

    stage: str
    fraction: float
    message: str


@dataclass(frozen=True)
class MergeReport:
    path: str
    max_logit_diff: float  # adapter-on vs merged, both in the adapter model's precision: checks the merge itself
    dtype: str
    seconds: float
    saved_logit_diff: float  # adapter-on vs the merged model as saved in `dtype` (adds its rounding, if narrower)
    notes: tuple[str, ...] = ()  # what the merge changed beyond adding the deltas, for the user to read


MergeProgressCallback = Callable[[MergeProgress], None]


# ---- save ----------------------------------------------------------------------------------------------------

def save_adapter(peft_model: Any, out_dir: str | Path, *, base_model_spec: str | None = None) -> Path:
    """Write the adapter in PEFT format (adapter_config.json + adapter_model.safetensors) to `out_dir`.

    `base_model_spec` is what the studio opened the base from (`LoadedModel.source.spec`); it decides what
    `base_model_name_or_path` says (see `_base_reference`). Full embedding matrices are saved only when the
    vocabulary was resized, as PEFT needs them then; otherwise the file holds the adapter alone.
    """
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"save_adapter needs a PeftModel, got {type(peft_model).__name__}")
    target = Path(out_dir).expanduser()
    hf_model = peft_model.get_base_model()
    reference = _base_reference(hf_model, base_model_spec)
    previous = {name: config.base_model_name_or_path for name, config in peft_model.peft_config.items()}
    try:
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = reference
        with _atomic_folder(target, "adapter") as staging:
            peft_model.save_pretrained(str(staging), save_embedding_layers=_vocab_resized(hf_model))
    finally:
        for name, value in previous.items():
            peft_model.peft_config[name].base_model_name_or_path = value
    return target


def _base_reference(hf_model: Any, spec: str | None) -> str | None:
    """A base_model_name_or_path that both transformers (AutoPeftModel) and `open_model` can open: a hub id or a
    weights folder as given; for the built-in model and .gguf files, the converted folder the weights were read
    from, since `default` or a GGUF path means nothing to transformers."""
    if spec:
        try:
            source = resolve_source(spec)
        except StudioError:
            source = None
        if source is not None and source.kind in ("hub", "folder"):
            return source.location
    return getattr(hf_model, "name_or_path", None) or spec


def _vocab_resized(hf_model: Any) -> bool:
    """Whether the input embeddings no longer match the vocabulary of the weights on disk (tokens were added)."""
    folder = getattr(hf_model, "name_or_path", "")
    if not folder or not Path(folder, "config.json").is_file():
        return False
    try:
        original = type(hf_model.config).from_pretrained(folder).get_text_config().vocab_size
    except (OSError, ValueError, AttributeError):
        return False
    return int(hf_model.get_input_embeddings().weight.shape[0]) != int(original)


def export_run_adapter(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy a run's adapter (its final `adapter/`, else the newest checkpoint's) to `out_dir`, atomically."""
    run = Path(run_dir).expanduser()
    candidates = [run / "adapter"] + sorted(
        (run / "checkpoints").glob("step-*/adapter"), key=lambda p: int(p.parent.name.split("-", 1)[1]), reverse=True
    )
    source = next((c for c in candidates if (c / "adapter_config.json").is_file()), None)
    if source is None:
        raise ExportError(f"{run} holds no adapter yet: train it first, or pick a run folder")
    read_adapter_info(source)  # refuse a half-written or foreign folder before copying it
    with _atomic_folder(Path(out_dir).expanduser(), "adapter") as staging:
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, staging / item.name)
    return Path(out_dir).expanduser()


# ---- read / load ---------------------------------------------------------------------------------------------

def read_adapter_info(adapter_dir: str | Path) -> AdapterInfo:
    """Describe a PEFT LoRA adapter folder; ExportError when it is missing or is not one."""
    info, _ = _read_adapter(Path(adapter_dir).expanduser())
    return info


def _read_adapter(path: Path) -> tuple[AdapterInfo, dict[str, tuple[int, ...]]]:
    data = read_adapter_config(path)
    weights = next((path / name for name in ADAPTER_WEIGHTS if (path / name).is_file()), None)
    if weights is None:
        raise ExportError(f"{path} is not a complete PEFT adapter: it has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS[0]}")
    shapes = _tensor_shapes(weights)
    targets = data.get("target_modules") or ()
    variant: Variant = "dora" if data.get("use_dora") else "rslora" if data.get("use_rslora") else "lora"
    info = AdapterInfo(
        path=str(path),
        base_model=data.get("base_model_name_or_path"),
        targets=(targets,) if isinstance(targets, str) else tuple(sorted(targets)),
        r=int(data["r"]),
        alpha=float(data["lora_alpha"]),
        variant=variant,
        task_type=data.get("task_type"),
        modules=len({m.group("module") for key in shapes if (m := _LORA_KEY.match(key))}),
        parameters=sum(math.prod(shape) for shape in shapes.values()),
        file_bytes=weights.stat().st_size,
        modules_to_save=tuple(data.get("modules_to_save") or ()),
    )
    return info, shapes


def _tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the file's header (safetensors) or a memory map (.bin), not its data."""
    try:
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), framework="np") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        import torch

        state = torch.load(str(weights), map_location="cpu", weights_only=True, mmap=True)
        return {key: tuple(tensor.shape) for key, tensor in state.items()}
    except Exception as exc:  # noqa: BLE001 - safetensors and torch raise many types for a damaged file
        raise ExportError(f"{weights} is damaged or not a weights file: {first_line(exc)}") from exc


def load_adapter(loaded: LoadedModel, adapter_dir: str | Path, *, trainable: bool = False) -> Any:
    """Put an existing LoRA adapter onto `loaded.model` and return the PeftModel.

    PEFT wraps the target layers of `loaded.model` in place, so it becomes the base of the returned model
    (`.unload()` gives the plain base back). `trainable=True` makes the adapter weights trainable to continue
    training; otherwise it is ready to inspect or merge. Checks first that every adapted module exists in this
    model with the shapes the adapter was made for.
    """
    path = Path(adapter_dir).expanduser()
    info, shapes = _read_adapter(path)
    require_weights(loaded, "load an adapter")
    expected_task = PEFT_TASKS.get(info.task_type or "")
    if expected_task and expected_task != loaded.task:
        raise ExportError(f"this adapter was trained for {expected_task}, but the model is open for {loaded.task}")
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(module, BaseTunerLayer) for module in loaded.model.modules()):
        raise ExportError("this model already carries an adapter: unload it or reopen the base model first")
    _check_fits(loaded, info, shapes)
    try:
        peft_model = PeftModel.from_pretrained(loaded.model, str(path), is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        _remove_adapter_layers(loaded.model)
        raise ExportError(f"cannot load the adapter {path}: {first_line(exc)}") from exc
    wrapped = {name for name, module in loaded.model.named_modules() if isinstance(module, BaseTunerLayer)}
    missing = sorted(wrapped - _adapted_modules(shapes))
    if missing:
        # the targets match modules here that the adapter holds no weights for: it was made for another model
        peft_model.unload()
        raise ExportError(
            f"the adapter does not fit {loaded.display_name}: its targets match {len(wrapped)} modules here but it "
            f"holds weights for {len(wrapped) - len(missing)} (none for {missing[0]}); {_made_for(info)}"
        )
    return peft_model


def _adapted_modules(shapes: dict[str, tuple[int, ...]]) -> set[str]:
    return {m.group("module").removeprefix(PEFT_KEY_PREFIX) for key in shapes if (m := _LORA_KEY.match(key))}


def _check_fits(loaded: LoadedModel, info: AdapterInfo, shapes: dict[str, tuple[int, ...]]) -> None:
    """Compare every LoRA matrix in the file with the module it adapts, before PEFT touches the model."""
    from studio.core.inventory import build

    tree = build(loaded.model, loaded.task)
    params = dict(loaded.model.named_parameters(remove_duplicate=False))
    made_for = _made_for(info)
    for key, shape in shapes.items():
        match = _LORA_KEY.match(key)
        if match is None:
            # a full copy (modules_to_save, embeddings of a resized vocabulary, a trained bias)
            name = key.removeprefix(PEFT_KEY_PREFIX).replace(".modules_to_save", "").replace(".base_layer", "")
            if name in params and tuple(params[name].shape) != shape:
                raise ExportError(
                    f"the adapter does not fit {loaded.display_name}: it holds {name} as {_dims(shape)}, "
                    f"but it is {_dims(params[name].shape)} here; {made_for}"
                )
            continue
        name, role = match.group("module").removeprefix(PEFT_KEY_PREFIX), match.group("role")
        if name not in tree:
            raise ExportError(f"the adapter does not fit {loaded.display_name}: it adapts {name}, "
                              f"which this model does not have; {made_for}")
        module = tree[name]
        if not module.targetable:
            raise ExportError(f"the adapter adapts {name}, a {module.class_name} LoRA cannot adapt; {made_for}")
        n_in, n_out = int(module.in_features or 0), int(module.out_features or 0)
        fits = shape[1] == n_in if role in ("lora_A.weight", "lora_embedding_A") else shape[0] == n_out
        if len(shape) != 2 or not fits:
            raise ExportError(
                f"the adapter does not fit {loaded.display_name}: {name} is {module.shape} here, but the adapter's "
                f"{role} for it is {_dims(shape)}; {made_for}"
            )


def _made_for(info: AdapterInfo) -> str:
    return f"it was made for {info.base_model}" if info.base_model else "it was made for another model"


def _dims(shape: Sequence[int]) -> str:
    return "×".join(str(int(d)) for d in shape)


def _remove_adapter_layers(model: Any) -> None:
    """Put back the original layers where a failed PEFT load had already wrapped them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in wrapped:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


# ---- merge ---------------------------------------------------------------------------------------------------

def merge_and_save(
    peft_model: Any,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    dtype: MergeDtype = "float32",
    probe_input_ids: Sequence[int] | Any | None = None,
    on_progress: MergeProgressCallback | None = None,
) -> MergeReport:
    """Save base + adapter as one plain model folder (safetensors, config, generation config, tokenizer) that
    `AutoModelForCausalLM.from_pretrained(out_dir)` opens, and check it against the adapter on a probe batch.

    The caller's PeftModel is left exactly as it was. Merging in place and unmerging afterwards would leave
    rounding drift in its base weights (large in bf16), and a deep copy of the whole model doubles memory on
    its device. Instead each adapted layer is copied on its own, merged there by PEFT, and moved to the CPU:
    the extra device memory is one layer, and the CPU holds the model that is being written anyway (sharing
    the unchanged tensors with a CPU base). The merge is checked in the base's precision, then cast to `dtype`.

    A 4-bit/8-bit base is refused: its weights are rounded, so a merged model would bake that rounding into
    the adapter's update; merge into the unquantized base instead.
    """
    started = time.perf_counter()
    report = on_progress or (lambda _p: None)
    if dtype not in MERGE_DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}: use {', '.join(MERGE_DTYPES)}")
    hf_model = peft_model.get_base_model()
    quantized = _quantization_of(hf_model)
    if quantized:
        raise ExportError(
            f"cannot merge into a quantized base ({quantized}): the merged weights would carry its rounding error; "
            "save the adapter, reopen the base without quantization (e.g. bfloat16) and merge there"
        )
    import torch

    report(MergeProgress("merge", 0.0, "Merging the adapter into a copy of the base weights"))
    merged, notes = _merged_model(hf_model, report)
    report(MergeProgress("verify", 0.75, "Comparing the merged model with the adapter on a probe batch"))
    probe = _probe_ids(probe_input_ids, tokenizer, hf_model)
    expected = _adapter_logits(peft_model, probe)
    diff = saved_diff = _max_logit_diff(expected, merged, probe)
    if any(t.is_floating_point() and t.dtype != getattr(torch, dtype) for t in merged.state_dict().values()):
        merged.to(getattr(torch, dtype))  # replaces the copy's tensors; the caller's weights stay untouched
        saved_diff = _max_logit_diff(expected, merged, probe)
    target = Path(out_dir).expanduser()
    report(MergeProgress("save", 0.85, f"Writing the merged model to {target}"))
    with _atomic_folder(target, "merged model") as staging:
        merged.save_pretrained(str(staging))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    report(MergeProgress("done", 1.0, f"Merged model saved to {target}"))
    return MergeReport(str(target), diff, dtype, time.perf_counter() - started, saved_diff, notes)


def _quantization_of(hf_model: Any) -> str | None:
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


def _merged_model(hf_model: Any, report: MergeProgressCallback) -> tuple[Any, tuple[str, ...]]:
    """A plain copy of the base architecture on the CPU, in the base's own dtypes, holding base + adapter weights.
    Tensors the adapter does not change share memory with the base when it is on the CPU already."""
    import torch
    from transformers.initialization import no_init_weights

    wrappers = _adapter_wrappers(hf_model)
    tensors: dict[str, Any] = {}
    for i, (name, wrapper) in enumerate(wrappers.items()):
        merged = _merged_module(name, wrapper)
        for key, value in [*merged.named_parameters(), *merged.named_buffers()]:
            tensors[f"{name}.{key}"] = value.detach().to("cpu")
        del merged
        report(MergeProgress("merge", 0.7 * (i + 1) / len(wrappers), f"Merged {name}"))

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


# ---- atomic folders ------------------------------------------------------------------------------------------

@contextmanager
def _atomic_folder(target: Path, what: str) -> Iterator[Path]:
    """Yield a temp folder next to `target`; once the block completes, it becomes `target`. On any failure the
    temp folder is removed and an earlier `target` stays as it was; write errors become ExportError."""
    blocker = next((p for p in (target, *target.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ExportError(f"cannot write the {what} to {target}: {blocker} is a file, not a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    except OSError as exc:
        raise ExportError(f"cannot write the {what} to {target}: {_write_failure(exc)}") from exc
    try:
        yield staging
        _swap_into_place(staging, target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        reason = _write_failure(exc)
        if reason is not None:
            raise ExportError(f"cannot write the {what} to {target}: {reason}") from exc
        raise


def _swap_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
        return
    retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(retired)
    try:
        staging.rename(target)
    except OSError:
        retired.rename(target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _write_failure(exc: BaseException) -> str | None:
    """The reason a write failed, in words, or None when `exc` is not a write failure (a bug keeps its trace)."""
    if isinstance(exc, OSError):
        reason = exc.strerror or first_line(exc)
        return f"{reason} (free some space or choose another folder)" if exc.errno == errno.ENOSPC else reason
    io_error = re.search(r"I/O error: (.+)", str(exc))  # safetensors reports OS errors inside its own type
    return io_error.group(1) if type(exc).__name__ == "SafetensorError" and io_error else None
