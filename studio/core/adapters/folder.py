"""The PEFT LoRA adapter folder, written down once: its file names, the key prefix and LoRA key pattern of its
tensors, its adapter_config.json (read and checked), the shapes of its tensors, and the plan it embodies. Every
reader (export, load, merge, spectra, a run that continues an adapter, GGUF) goes through here, so a broken
folder gets the same one line everywhere, and .bin adapters are read wherever safetensors ones are."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.core.errors import ExportError, first_line
from studio.core.model.inventory import ModuleTree
from studio.core.model.plan import LoraPlan, Variant

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's file names, preferred first

PEFT_KEY_PREFIX = "base_model.model."  # PEFT's prefix on every tensor key of a transformers model's adapter

PEFT_TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "seq-cls"}
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<role>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


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


def read_adapter_config(path: Path) -> dict[str, Any]:
    """The folder's adapter config; ExportError naming what is wrong when it is not a usable LoRA adapter."""
    if not path.exists():
        raise ExportError(f"no such adapter folder: {path}")
    if not path.is_dir():
        raise ExportError(f"{path} is a file: pick the adapter's folder (the one holding {ADAPTER_CONFIG})")
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise ExportError(f"{path} is not a PEFT adapter folder: it has no {ADAPTER_CONFIG}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{config_file} is not readable JSON: {first_line(exc)}") from exc
    if not isinstance(config, dict):
        raise ExportError(f"{config_file} does not hold a JSON object: re-save the adapter")
    if config.get("peft_type") != "LORA":
        kind = config.get("peft_type") or "no named"
        raise ExportError(f"{path} holds an adapter of type {kind}, not LoRA (the only type LoRA Studio loads)")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise ExportError(f"{config_file} has no positive `{key}`: re-save the adapter")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in patterns.values()):
            raise ExportError(f"{config_file}: `{key}` must map module patterns to positive numbers")
    return config


def read_adapter_info(adapter_dir: str | Path) -> AdapterInfo:
    """Describe a PEFT LoRA adapter folder; ExportError when it is missing or is not one."""
    info, _ = read_adapter(Path(adapter_dir).expanduser())
    return info


def read_adapter(path: Path) -> tuple[AdapterInfo, dict[str, tuple[int, ...]]]:
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
        modules=len({m.group("module") for key in shapes if (m := LORA_KEY.match(key))}),
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


def adapted_modules(shapes: dict[str, tuple[int, ...]]) -> set[str]:
    return {m.group("module").removeprefix(PEFT_KEY_PREFIX) for key in shapes if (m := LORA_KEY.match(key))}


def plan_of_adapter(tree: ModuleTree, adapter_dir: str | Path) -> LoraPlan:
    """The plan an existing adapter embodies (its modules, ranks and alpha), for counts and the run's records."""
    path = Path(adapter_dir).expanduser()
    info, shapes = read_adapter(path)  # raises ExportError for a folder that is not a LoRA adapter
    config = read_adapter_config(path)
    ranks: dict[str, int] = {}
    for key, shape in shapes.items():
        match = LORA_KEY.match(key)
        if match and match.group("role") in ("lora_A.weight", "lora_embedding_A"):
            ranks[match.group("module").removeprefix(PEFT_KEY_PREFIX)] = int(shape[0])
    targets = tuple(name for name in tree.modules if name in ranks)
    overrides = {name: r for name, r in ranks.items() if r != info.r and name in tree}
    return LoraPlan(targets=targets, rank=info.r, alpha=info.alpha, rank_overrides=overrides,
                    dropout=float(config.get("lora_dropout", 0.0)), bias=config.get("bias", "none"),
                    variant=info.variant, modules_to_save=tuple(config.get("modules_to_save") or ()))
