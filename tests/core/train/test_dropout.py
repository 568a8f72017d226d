"""The CPU's sparse LoRA dropout: the law of nn.Dropout's masks (i.i.d. Bernoulli, kept values scaled by 1/(1-p)),
swapped in by a CPU run and taken out again when it ends."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from studio.core import events as ev
from studio.core.runconfig import ModelConfig, RunConfig, TrainingConfig
from studio.core.train.dropout import SparseDropout, dropped_positions, use_sparse_dropout
from studio.core.train.engine import train


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.9])
def test_dropped_positions_follow_independent_bernoulli_draws(p):
    n = 400_000
    torch.manual_seed(0)
    positions = dropped_positions(n, p)
    assert bool((positions[1:] > positions[:-1]).all()) and int(positions[0]) >= 0 and int(positions[-1]) < n
    dropped = torch.zeros(n, dtype=torch.float64)
    dropped[positions] = 1.0
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(float(dropped.mean()) - p) < 5 * sigma
    # independent neighbours: P(both dropped) = p², within the sampling error of n pairs
    both = float((dropped[1:] * dropped[:-1]).mean())
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n)
    # runs of kept values are geometric: their mean length is (1 - p) / p
    gaps = (positions[1:] - positions[:-1] - 1).double()
    assert abs(float(gaps.mean()) - (1 - p) / p) < 5 * math.sqrt(1 - p) / p / math.sqrt(len(gaps))


def test_sparse_dropout_scales_what_it_keeps_and_passes_the_mask_to_the_gradient():
    torch.manual_seed(1)
    x = torch.randn(4, 32, 96, requires_grad=True)
    out = SparseDropout(0.2)(x)
    kept = out != 0
    assert torch.allclose(out[kept], x[kept] / 0.8)
    out.backward(torch.ones_like(out))
    assert torch.allclose(x.grad, kept.float() / 0.8)
    assert 0.15 < 1 - float(kept.float().mean()) < 0.25


def test_sparse_dropout_is_the_identity_in_evaluation_and_repeats_under_a_seed():
    x = torch.randn(8, 64)
    dropout = SparseDropout(0.5)
    assert torch.equal(dropout.eval()(x), x)
    dropout.train()
    torch.manual_seed(3)
    first = dropout(x)
    torch.manual_seed(3)
    assert torch.equal(dropout(x), first) and not torch.equal(first, x)


def test_use_sparse_dropout_swaps_every_adapter_dropout_and_undoes_it(tiny_llama):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
    before = [m for m in model.modules() if type(m) is nn.Dropout]
    assert before
    undo = use_sparse_dropout(model)
    swapped = [m for m in model.modules() if isinstance(m, SparseDropout)]
    assert len(swapped) == len(before) and all(m.p == 0.1 for m in swapped)
    assert not [m for m in model.modules() if type(m) is nn.Dropout]
    undo()
    assert [m for m in model.modules() if type(m) is nn.Dropout] == before


def test_a_cpu_run_trains_with_sparse_dropout_and_returns_peft_modules(tiny_model_folder, tmp_path):
    from studio.core.model.loading import open_model

    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"text": "row {i} of the sparse dropout test"}}\n' for i in range(16)))
    config = RunConfig(
        model=ModelConfig(source=str(tiny_model_folder), device="cpu"),
        plan={"targets": "all-linear", "rank": 4, "alpha": 8, "dropout": 0.1},
        data={"train_path": str(data), "format": "text", "max_length": 32},
        training=TrainingConfig(max_steps=3, batch_size=4, eval_every=0, eval_examples=0, save_every=0,
                                spectrum_every=0),
        output_dir=str(tmp_path / "runs"),
    )
    loaded = open_model(str(tiny_model_folder))
    seen: list[int] = []

    def on_event(event):
        if isinstance(event, ev.StepMetrics):  # during the run: the adapters' dropout is the sparse one
            seen.append(sum(isinstance(m, SparseDropout) for m in loaded.model.modules()))

    result = train(config, on_event, loaded=loaded)
    assert isinstance(result, ev.Finished) and math.isfinite(result.final_loss)
    assert seen and all(count > 0 for count in seen)
    assert not any(isinstance(m, SparseDropout) for m in loaded.model.modules())
    assert any(type(m) is nn.Dropout and m.p == 0.1 for m in loaded.model.modules())
