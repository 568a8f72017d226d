"""LoRA models whose adapter changes the output, for the adapter tests: B drawn at random (PEFT starts it at
zero), their logits, their wrapped modules, and a small saved adapter."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

from studio.core.adapters.saving import save_adapter


def randomize_lora_b(peft_model: PeftModel, seed: int = 0) -> None:
    """PEFT starts B at zero (the adapter changes nothing); random B makes every check on it measurable."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    peft_model.eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def lora_modules(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def tiny_adapter(model, out: Path, **config) -> Path:
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **config))
    randomize_lora_b(peft_model)
    return save_adapter(peft_model, out)

