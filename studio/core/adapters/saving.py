"""Save a PEFT adapter (as the training loop does) and copy a run's adapter out of its run folder (the Export
action). Each folder is written atomically, and only where the studio may write (files.py)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from studio.core.adapters.folder import read_adapter_info, run_adapter
from studio.core.errors import ExportError, StudioError
from studio.core.files import MANIFEST, atomic_folder, check_output_folder
from studio.core.model.loading import resolve_source


def save_adapter(peft_model: Any, out_dir: str | Path, *, base_model_spec: str | None = None, force: bool = False,
                 owned: bool = False, state_dict: dict[str, Any] | None = None) -> Path:
    """Write the adapter in PEFT format (adapter_config.json + adapter_model.safetensors) to `out_dir`: a folder
    the studio may write (files.atomic_folder: `force` writes beside a person's files, `owned` replaces a folder
    of the caller's own, such as a run's adapter/).

    `base_model_spec` is what the studio opened the base from (`LoadedModel.source.spec`); it decides what
    `base_model_name_or_path` says (see `_base_reference`). Full embedding matrices are saved only when the
    vocabulary was resized, as PEFT needs them then; otherwise the file holds the adapter alone. `state_dict`: the
    model's tensors by parameter name, saved instead of its own (whole ones, where the model holds slices: FSDP).
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
        with atomic_folder(target, "adapter", force=force, owned=owned) as staging:
            peft_model.save_pretrained(str(staging), save_embedding_layers=_vocab_resized(hf_model),
                                       state_dict=state_dict)
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


def export_run_adapter(run_dir: str | Path, out_dir: str | Path, *, force: bool = False) -> Path:
    """Copy a run's adapter (its final `adapter/`, else the newest checkpoint's) to `out_dir`, atomically: a folder
    the studio may write (files.check_output_folder; `force` writes beside a person's files, which stay)."""
    run = Path(run_dir).expanduser()
    target = Path(out_dir).expanduser()
    check_output_folder(target, "adapter", force=force)
    source = run_adapter(run)
    if source is None:
        raise ExportError(f"{run} holds no adapter yet: train it first, or pick a run folder")
    read_adapter_info(source)  # refuse a half-written or foreign folder before copying it
    with atomic_folder(target, "adapter", force=force) as staging:
        for item in source.iterdir():
            if item.is_file() and item.name != MANIFEST:
                shutil.copy2(item, staging / item.name)
    return target
