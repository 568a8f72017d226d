"""The adapter folder format read back: the plan a saved adapter embodies (safetensors and .bin alike) and where a
run folder keeps its adapter."""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model

from studio.core.adapters.folder import plan_of_adapter, read_adapter_info, run_adapter
from studio.core.adapters.saving import export_run_adapter
from studio.core.model import inventory
from tests.core.adapters.lora_models import tiny_adapter


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_plan_of_adapter_reads_modules_ranks_and_alpha_from_safetensors_and_bin(tiny_llama, tmp_path,
                                                                               safe_serialization):
    tree = inventory.build(tiny_llama)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "down_proj"],
                        rank_pattern={"q_proj": 4, "model.layers.1.mlp.down_proj": 12})
    get_peft_model(tiny_llama, config).save_pretrained(tmp_path, safe_serialization=safe_serialization)
    weights = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    assert (tmp_path / weights).is_file() and len(list(tmp_path.glob("adapter_model.*"))) == 1

    plan = plan_of_adapter(tree, tmp_path)

    layers = range(3)
    assert plan.targets == tuple(name for name in tree.modules if name in {
        *(f"model.layers.{i}.self_attn.q_proj" for i in layers), *(f"model.layers.{i}.mlp.down_proj" for i in layers)})
    assert len(plan.targets) == 6
    assert (plan.rank, plan.alpha, plan.dropout, plan.variant) == (8, 16.0, 0.1, "lora")
    assert plan.rank_overrides == {**{f"model.layers.{i}.self_attn.q_proj": 4 for i in layers},
                                   "model.layers.1.mlp.down_proj": 12}
    assert read_adapter_info(tmp_path).modules == 6


def test_a_run_adapter_is_the_final_one_else_the_newest_checkpoints_and_odd_folder_names_are_ignored(
        tiny_llama, tmp_path):
    model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]))
    run = tmp_path / "run"
    assert run_adapter(run) is None
    for name in ("step-3", "step-12", "step-40 copy", "step-x", ".step-50.partial"):
        model.save_pretrained(run / "checkpoints" / name / "adapter")
    (run / "checkpoints" / "step-99").write_text("a file, not a checkpoint")

    assert run_adapter(run) == run / "checkpoints" / "step-12" / "adapter"
    assert export_run_adapter(run, tmp_path / "out") == tmp_path / "out"
    assert (tmp_path / "out" / "adapter_config.json").read_text() == (
        run / "checkpoints" / "step-12" / "adapter" / "adapter_config.json").read_text()

    model.save_pretrained(run / "adapter")
    assert run_adapter(run) == run / "adapter"


def test_read_adapter_info_names_the_variant(tiny_llama, tmp_path):
    out = tiny_adapter(tiny_llama, tmp_path / "dora", r=2, lora_alpha=4, target_modules=["o_proj"], use_dora=True)
    info = read_adapter_info(out)
    assert (info.variant, info.r, info.alpha, info.targets, info.modules) == ("dora", 2, 4.0, ("o_proj",), 3)

