"""How PEFT names the tensors of a LoRA adapter (the keys in adapter_model.safetensors), written down once. The
plan's counts size that file before it exists (plan.py); adapters/folder.py reads saved files back. Both need the
same names, and the counts sit below the adapters package, so the names live here."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

PEFT_KEY_PREFIX = "base_model.model."  # PEFT's prefix on every tensor key of a transformers model's adapter
A_ROLES = ("lora_A.weight", "lora_embedding_A")  # r×fan_in: linear layers, embeddings
B_ROLES = ("lora_B.weight", "lora_embedding_B")  # fan_out×r
_LORA_KEY = re.compile(rf"^(?P<module>.+)\.(?P<role>{'|'.join(re.escape(role) for role in A_ROLES + B_ROLES)})$")


@dataclass(frozen=True)
class LoraKey:
    """One LoRA factor's key taken apart."""

    module: str  # the base model's module name, PEFT's prefix removed
    role: str  # one of A_ROLES or B_ROLES

    @property
    def side(self) -> Literal["A", "B"]:
        return "A" if self.role in A_ROLES else "B"


def saved_key(name: str) -> str:
    """The key PEFT saves the base model's tensor or module `name` under."""
    return PEFT_KEY_PREFIX + name


def lora_keys(module: str, embedding: bool) -> tuple[str, str]:
    """The keys of a module's A and B factors."""
    a, b = (A_ROLES[1], B_ROLES[1]) if embedding else (A_ROLES[0], B_ROLES[0])
    return saved_key(f"{module}.{a}"), saved_key(f"{module}.{b}")


def parse_lora_key(key: str) -> LoraKey | None:
    """The module and role of a LoRA factor's key; None for any other tensor (a saved module, a bias, DoRA's
    magnitude). A key without PEFT's prefix is read too."""
    match = _LORA_KEY.match(key)
    if match is None:
        return None
    return LoraKey(match.group("module").removeprefix(PEFT_KEY_PREFIX), match.group("role"))
