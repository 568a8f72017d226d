"""A saved PEFT LoRA adapter folder's `adapter_config.json`, read and checked in one place for every reader
(export, merge, spectra, a run that continues an adapter), so a broken folder gets the same one line everywhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from studio.core.errors import ExportError, first_line

ADAPTER_CONFIG = "adapter_config.json"


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
