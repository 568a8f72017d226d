"""Put an existing LoRA adapter onto an open model, after checking that every matrix in it fits the module it
adapts (a clear line naming the first that does not, instead of PEFT's shape error deep in a load)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from studio.core.adapters.folder import PEFT_TASKS, AdapterInfo, adapted_modules, read_adapter
from studio.core.errors import ExportError, first_line
from studio.core.model.adapter_keys import PEFT_KEY_PREFIX, parse_lora_key
from studio.core.model.loading import LoadedModel, require_weights


def load_adapter(loaded: LoadedModel, adapter_dir: str | Path, *, trainable: bool = False) -> Any:
    """Put an existing LoRA adapter onto `loaded.model` and return the PeftModel.

    PEFT wraps the target layers of `loaded.model` in place, so it becomes the base of the returned model
    (`.unload()` gives the plain base back). `trainable=True` makes the adapter weights trainable to continue
    training; otherwise it is ready to inspect or merge. Checks first that every adapted module exists in this
    model with the shapes the adapter was made for.
    """
    path = Path(adapter_dir).expanduser()
    info, shapes = read_adapter(path)
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
    missing = sorted(wrapped - adapted_modules(shapes))
    if missing:
        # the targets match modules here that the adapter holds no weights for: it was made for another model
        peft_model.unload()
        raise ExportError(
            f"the adapter does not fit {loaded.display_name}: its targets match {len(wrapped)} modules here but it "
            f"holds weights for {len(wrapped) - len(missing)} (none for {missing[0]}); {_made_for(info)}"
        )
    return peft_model


def _check_fits(loaded: LoadedModel, info: AdapterInfo, shapes: dict[str, tuple[int, ...]]) -> None:
    """Compare every LoRA matrix in the file with the module it adapts, before PEFT touches the model."""
    from studio.core.model.inventory import build

    tree = build(loaded.model, loaded.task)
    params = dict(loaded.model.named_parameters(remove_duplicate=False))
    made_for = _made_for(info)
    for key, shape in shapes.items():
        lora_key = parse_lora_key(key)
        if lora_key is None:
            # a full copy (modules_to_save, embeddings of a resized vocabulary, a trained bias)
            name = key.removeprefix(PEFT_KEY_PREFIX).replace(".modules_to_save", "").replace(".base_layer", "")
            if name in params and tuple(params[name].shape) != shape:
                raise ExportError(
                    f"the adapter does not fit {loaded.display_name}: it holds {name} as {_dims(shape)}, "
                    f"but it is {_dims(params[name].shape)} here; {made_for}"
                )
            continue
        name, role = lora_key.module, lora_key.role
        if name not in tree:
            raise ExportError(f"the adapter does not fit {loaded.display_name}: it adapts {name}, "
                              f"which this model does not have; {made_for}")
        module = tree[name]
        if not module.targetable:
            raise ExportError(f"the adapter adapts {name}, a {module.class_name} LoRA cannot adapt; {made_for}")
        n_in, n_out = int(module.in_features or 0), int(module.out_features or 0)
        fits = shape[1] == n_in if lora_key.side == "A" else shape[0] == n_out
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
