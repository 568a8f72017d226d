"""The PEFT LoRA adapter folder, written down once: its file names, its adapter_config.json (read and checked), the
shapes and tensors of its weights file (safetensors or .bin), the plan it embodies, and where a run folder keeps
its adapter. Every reader (export, load, merge, spectra, checkpoints, a run that continues an adapter, GGUF) goes
through here, so a broken folder gets the same one line everywhere, and .bin adapters are read wherever
safetensors ones are. The tensor keys inside follow model/adapter_keys.py."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from studio.core import run_layout
from studio.core.errors import ExportError, first_line
from studio.core.model.adapter_keys import parse_lora_key
from studio.core.model.inventory import ModuleTree
from studio.core.model.plan import LoraPlan, Variant

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's file names, preferred first

PEFT_TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "seq-cls"}


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
    """The folder's description and the shape of every tensor in its weights file (read without the data)."""
    data = read_adapter_config(path)
    weights = weights_file(path)
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
        modules=len(adapted_modules(shapes)),
        parameters=sum(math.prod(shape) for shape in shapes.values()),
        file_bytes=weights.stat().st_size,
        modules_to_save=tuple(data.get("modules_to_save") or ()),
    )
    return info, shapes


def weights_file(path: Path) -> Path:
    """The folder's weights file, safetensors preferred; ExportError when it has none."""
    weights = next((path / name for name in ADAPTER_WEIGHTS if (path / name).is_file()), None)
    if weights is None:
        raise ExportError(f"{path} is not a complete PEFT adapter: it has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS[0]}")
    return weights


def read_adapter_tensors(adapter_dir: str | Path, keep: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """The tensors of the folder's weights file (all, or those whose key `keep` accepts), as CPU torch tensors
    keyed as saved; ExportError for a missing or damaged file."""
    weights = weights_file(Path(adapter_dir).expanduser())
    try:
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt", device="cpu") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys() if keep is None or keep(key)}
        import torch

        state = torch.load(str(weights), map_location="cpu", weights_only=True, mmap=True)
        return {key: tensor for key, tensor in state.items() if keep is None or keep(key)}
    except Exception as exc:  # noqa: BLE001 - safetensors and torch raise many types for a damaged file
        raise _damaged(weights, exc) from exc


def read_lora_factors(adapter_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Module name (the base model's) -> {"A": tensor, "B": tensor} for every LoRA factor in the folder's weights
    file; a module missing one of its factors has one entry. ExportError when the file holds no factor at all."""
    path = Path(adapter_dir).expanduser()
    factors: dict[str, dict[str, Any]] = {}
    for key, tensor in read_adapter_tensors(path, keep=lambda key: parse_lora_key(key) is not None).items():
        if (lora_key := parse_lora_key(key)) is not None:
            factors.setdefault(lora_key.module, {})[lora_key.side] = tensor
    if not factors:
        raise ExportError(f"{weights_file(path)} holds no LoRA A/B matrices")
    return factors


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
        raise _damaged(weights, exc) from exc


def _damaged(weights: Path, exc: Exception) -> ExportError:
    return ExportError(f"{weights} is damaged or not a weights file: {first_line(exc)}")


def adapted_modules(shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """The base model's names of the modules whose LoRA factors the weights file holds."""
    return {lora_key.module for key in shapes if (lora_key := parse_lora_key(key))}


def plan_of_adapter(tree: ModuleTree, adapter_dir: str | Path) -> LoraPlan:
    """The plan an existing adapter embodies (its modules, ranks and alpha), for counts and the run's records."""
    path = Path(adapter_dir).expanduser()
    info, shapes = read_adapter(path)  # raises ExportError for a folder that is not a LoRA adapter
    config = read_adapter_config(path)
    ranks: dict[str, int] = {}
    for key, shape in shapes.items():
        lora_key = parse_lora_key(key)
        if lora_key is not None and lora_key.side == "A":
            ranks[lora_key.module] = int(shape[0])
    targets = tuple(name for name in tree.modules if name in ranks)
    overrides = {name: r for name, r in ranks.items() if r != info.r and name in tree}
    return LoraPlan(targets=targets, rank=info.r, alpha=info.alpha, rank_overrides=overrides,
                    dropout=float(config.get("lora_dropout", 0.0)), bias=config.get("bias", "none"),
                    variant=info.variant, modules_to_save=tuple(config.get("modules_to_save") or ()))


def run_adapter(run_dir: str | Path) -> Path | None:
    """A run folder's adapter: its final one, else its newest checkpoint's; None before either exists."""
    run = Path(run_dir).expanduser()
    candidates = [run / run_layout.ADAPTER]
    candidates += [checkpoint / run_layout.ADAPTER for checkpoint in reversed(run_layout.checkpoint_folders(run))]
    return next((folder for folder in candidates if (folder / ADAPTER_CONFIG).is_file()), None)
