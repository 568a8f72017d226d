"""Adapters that read the same input compute their first product together (shared_input.py): which ones, the same
losses and gradients as PEFT's own forward, eager and compiled, and nothing held past a layer."""

from __future__ import annotations

import math

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear

from studio.core import events as ev
from studio.core.runconfig import ModelConfig, RunConfig, TrainingConfig
from studio.core.train import shared_input
from studio.core.train.engine import train


def adapted(model, **lora):
    torch.manual_seed(1)
    settings = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)  # B != 0: a real update
    return get_peft_model(model, LoraConfig(**{**settings, **lora}))


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def names(model, groups):
    where = {id(m): n.split(".")[-1] for n, m in model.named_modules()}
    return [[where[id(layer)] for layer in group] for group in groups]


def test_groups_are_the_projections_that_read_the_same_tensor(tiny_llama):
    model = adapted(tiny_llama)
    groups = shared_input.find_groups(model, {"input_ids": torch.randint(0, 128, (1, 8))})
    layers = tiny_llama.config.num_hidden_layers
    # o_proj and down_proj read tensors of their own: never grouped
    assert names(model, groups) == [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]] * layers


def test_shared_products_give_peft_s_losses_and_gradients_and_undo_gives_peft_s_forward_back(tiny_llama):
    model = adapted(tiny_llama)
    ids = torch.randint(0, 128, (2, 12))
    own_loss, own_grads = loss_and_grads(model, ids)
    shared = shared_input.Shared(shared_input.find_groups(model, {"input_ids": ids[:1]}))
    loss, grads = loss_and_grads(model, ids)
    assert math.isclose(loss, own_loss, rel_tol=1e-6)
    assert grads.keys() == own_grads.keys()
    assert all(torch.allclose(grads[n], own_grads[n], atol=1e-6) for n in grads)
    assert all(g.source is None and not g.parts for g in shared.groups)  # no activation held past its layer
    first = shared.groups[0].layers[0]
    assert type(first).__name__ == "SharedInputLinear"
    shared.undo()
    assert type(first) is LoraLinear and not hasattr(first, "_shared_group")
    assert loss_and_grads(model, ids)[0] == own_loss


def test_a_4bit_base_shares_products_with_peft_s_losses_and_gradients(tiny_llama_4bit):
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    model = adapted(tiny_llama_4bit)
    ids = torch.randint(0, 128, (2, 12))
    groups = shared_input.find_groups(model, {"input_ids": ids[:1]})
    assert names(model, groups) == [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]] * 3
    assert type(groups[0][0]) is LoraLinear4bit
    # PEFT's own, measured after find_groups' no-grad forward: on the CPU bitsandbytes repacks 4-bit weights there
    # (and its CPU kernel then passes no gradient back through the base), so both sides see the same base
    own_loss, own_grads = loss_and_grads(model, ids)
    shared_input.Shared(groups)
    loss, grads = loss_and_grads(model, ids)
    assert type(groups[0][0]).__name__ == "SharedInputLinear4bit"
    # float32 rounding apart (up to 1e-5 here; PEFT's forward against itself: equal); a lost update is far larger
    assert math.isclose(loss, own_loss, rel_tol=1e-5)
    assert grads.keys() == own_grads.keys()
    assert all(torch.allclose(grads[n], own_grads[n], rtol=1e-3, atol=1e-5) for n in grads)


def test_a_bf16_base_under_autocast_shares_its_float32_adapters_inputs(tiny_llama):
    """As the engine trains a bf16 base on a GPU: float32 adapters, PEFT's input cast off, autocast on."""
    from peft.helpers import disable_input_dtype_casting

    model = adapted(tiny_llama.to(torch.bfloat16))
    ids = torch.randint(0, 128, (2, 12))
    bf16 = lambda: torch.autocast("cpu", torch.bfloat16)  # noqa: E731
    with disable_input_dtype_casting(model):
        with bf16():
            own_loss = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
        groups = shared_input.find_groups(model, {"input_ids": ids[:1]}, bf16)
        shared_input.Shared(groups)
        with bf16():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
    assert len(groups) == 2 * tiny_llama.config.num_hidden_layers
    assert math.isclose(loss, own_loss, rel_tol=1e-2)


def test_adapters_with_dropout_compute_alone(tiny_llama):
    ids = {"input_ids": torch.randint(0, 128, (1, 8))}
    assert shared_input.find_groups(adapted(tiny_llama, lora_dropout=0.1), ids) == []


def test_dora_adapters_compute_alone(tiny_llama):
    ids = {"input_ids": torch.randint(0, 128, (1, 8))}
    assert shared_input.find_groups(adapted(tiny_llama, use_dora=True), ids) == []


def compiled_loss_and_grads(model, ids):
    """Loss and gradients with each decoder layer compiled (aot_eager: the graphs Inductor would get), and the number
    of graphs compiled; fullgraph: a graph break raises."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    layers = model.get_base_model().model.layers
    for layer in layers:
        layer.compile(backend=counter, fullgraph=True)
    try:
        return (*loss_and_grads(model, ids), counter.frame_count)
    finally:
        for layer in layers:
            layer._compiled_call_impl = None
        torch._dynamo.reset()


def test_compiled_layers_take_the_shared_product_in_as_many_graphs_as_peft_s(tiny_llama):
    model = adapted(tiny_llama)
    ids = torch.randint(0, 128, (2, 12))
    _, _, own_graphs = compiled_loss_and_grads(model, ids)
    shared = shared_input.Shared(shared_input.find_groups(model, {"input_ids": ids[:1]}))
    eager_loss, eager_grads = loss_and_grads(model, ids)
    loss, grads, graphs = compiled_loss_and_grads(model, ids)
    # the layers share their code, grouped or not: a graph per kind of input (the first layer's needs no gradient),
    # not one per layer
    assert graphs == own_graphs < len(model.get_base_model().model.layers)
    assert math.isclose(loss, eager_loss, rel_tol=1e-6)
    assert all(torch.allclose(grads[n], eager_grads[n], atol=1e-6) for n in grads)
    assert all(g.source is None for g in shared.groups)


def test_a_run_shares_adapter_inputs_with_the_losses_of_one_that_does_not(tiny_model_folder, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"text": "{"word " * (3 + i % 7)}end"}}\n' for i in range(16)))
    runs = {}
    for shared in (True, False):
        config = RunConfig(
            model=ModelConfig(source=str(tiny_model_folder), device="cpu"),
            plan={"targets": "all-linear", "rank": 4, "alpha": 8, "dropout": 0.0},
            data={"train_path": str(data), "format": "text", "max_length": 32},
            training=TrainingConfig(max_steps=3, batch_size=4, eval_every=0, eval_examples=0, save_every=0,
                                    spectrum_every=0, shared_adapter_input=shared),
            output_dir=str(tmp_path / str(shared)),
        )
        events: list = []
        assert isinstance(train(config, events.append), ev.Finished)
        runs[shared] = ([e.loss for e in events if isinstance(e, ev.StepMetrics)],
                        [e.text for e in events if isinstance(e, ev.LogMessage) and "sharing" in e.text])
    assert runs[True][1] == ["adapters sharing an input: 4 groups of 2-3, one product each (shared_adapter_input)"]
    assert runs[False][1] == []
    assert len(runs[True][0]) == 3
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(runs[True][0], runs[False][0]))
