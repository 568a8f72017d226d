"""Fixtures of the adapter tests: the default model with a q/v adapter that changes its output, and a probe."""

from __future__ import annotations

import pytest
from peft import get_peft_model

from studio.core.model import inventory, plan
from tests.core.adapters.lora_models import randomize_lora_b

PROBE = "Write one sentence about adapters."


@pytest.fixture()
def adapted(fresh_default_model):
    """The default model with a q/v LoRA plan (rank 4) built through the studio's plan, B randomized."""
    tree = inventory.build(fresh_default_model.model)
    lora_plan = plan.LoraPlan(targets=tuple(inventory.select(tree, "q_proj,v_proj")), rank=4, alpha=8, dropout=0.0)
    peft_model = get_peft_model(fresh_default_model.model, plan.to_peft_config(lora_plan, tree))
    randomize_lora_b(peft_model)
    return fresh_default_model, peft_model, plan.count(tree, lora_plan)


@pytest.fixture()
def probe(default_tokenizer):
    return default_tokenizer(PROBE, return_tensors="pt").input_ids

