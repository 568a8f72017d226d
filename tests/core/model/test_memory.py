from __future__ import annotations

import pytest

from studio.core.model import inventory, memory
from studio.core.model.plan import LoraPlan, count


def test_estimate_parts_follow_the_plan_and_precision(default_model):
    tree = inventory.build(default_model.model)
    plan = LoraPlan(targets=tuple(inventory.select(tree, "all-linear")), rank=16, alpha=32)
    counts = count(tree, plan)
    bf16 = memory.estimate(tree, plan, counts, batch_size=4, seq_len=512, compute_dtype="bfloat16")
    nf4 = memory.estimate(tree, plan, counts, batch_size=4, seq_len=512, compute_dtype="bfloat16", quantization="4bit")
    checkpointed = memory.estimate(tree, plan, counts, batch_size=4, seq_len=512, gradient_checkpointing=True)
    trainable = counts.trainable
    assert bf16.weights == tree.total_params * 2
    assert bf16.adapter == bf16.gradients == trainable * 4 and bf16.optimizer == trainable * 8
    assert nf4.weights < bf16.weights * 0.7  # the linear layers shrink ~4x; embeddings stay 16-bit
    assert checkpointed.activations < bf16.activations / 2  # the logits are not checkpointed
    assert bf16.total == sum(value for _, value in bf16.parts())
    smaller = memory.estimate(tree, plan, counts, batch_size=2, seq_len=512, chunked_loss=False)
    own_loss = memory.estimate(tree, plan, counts, batch_size=4, seq_len=512, chunked_loss=False)
    bigger = memory.estimate(tree, plan, counts, batch_size=8, seq_len=512, chunked_loss=False)
    # with the model's own loss, everything grows per token but autocast's bf16 copy of the adapter weights
    assert bigger.activations - own_loss.activations == 2 * (own_loss.activations - smaller.activations)
    assert own_loss.activations - 2 * (own_loss.activations - smaller.activations) == trainable * 2


def test_the_chunked_loss_holds_one_chunk_of_logits_unless_the_head_is_adapted(default_model):
    from studio.core.train import losses

    assert memory.LOSS_CHUNK_ELEMENTS == losses.CHUNK_ELEMENTS
    tree = inventory.build(default_model.model)
    vocab = 49152
    plan = LoraPlan(targets=tuple(inventory.select(tree, "all-linear")), rank=16, alpha=32)
    kwargs = dict(batch_size=8, seq_len=2048)
    chunked = memory.estimate(tree, plan, count(tree, plan), **kwargs)
    own = memory.estimate(tree, plan, count(tree, plan), chunked_loss=False, **kwargs)
    assert own.activations - chunked.activations == 8 * 2048 * vocab * 10 - memory.LOSS_CHUNK_ELEMENTS * 8
    with_head = LoraPlan(targets=plan.targets + ("lm_head",), rank=16, alpha=32)
    head_counts = count(tree, with_head)
    assert memory.estimate(tree, with_head, head_counts, **kwargs).activations == memory.estimate(
        tree, with_head, head_counts, chunked_loss=False, **kwargs).activations  # the engine keeps its own loss then
    saved_head = LoraPlan(targets=plan.targets, modules_to_save=("lm_head",))
    assert memory.estimate(tree, saved_head, count(tree, saved_head), **kwargs).activations == memory.estimate(
        tree, saved_head, count(tree, saved_head), chunked_loss=False, **kwargs).activations


def test_judge_gives_a_verdict_and_what_to_change(default_model):
    tree = inventory.build(default_model.model)
    plan = LoraPlan(targets=tuple(inventory.select(tree, "all-linear")))
    est = memory.estimate(tree, plan, count(tree, plan), batch_size=8, seq_len=2048)
    assert memory.judge(est, 80 * memory.GIB).verdict == "fits"
    tight = memory.judge(est, int(est.total / 0.95), batch_size=8)
    assert tight.verdict == "tight"
    small = memory.judge(est, 2 * memory.GIB, batch_size=8)
    assert small.verdict == "will-not-fit"
    assert "lower the batch size" in small.advice and "GiB" in small.advice
    assert memory.judge(est, None).verdict == "unknown"


def test_judge_offers_checkpointing_when_it_closes_the_gap_though_the_activations_are_small_beside_the_weights(
        default_model):
    tree = inventory.build(default_model.model)
    plan = LoraPlan(targets=tuple(inventory.select(tree, "attention")), rank=8, alpha=16)
    counts = count(tree, plan)
    est = memory.estimate(tree, plan, counts, batch_size=1, seq_len=64)
    checkpointed = memory.estimate(tree, plan, counts, batch_size=1, seq_len=64, gradient_checkpointing=True)
    assert est.activations < est.weights / 2  # comparing with the weights offered only a lower rank here
    saved = est.activations - checkpointed.activations
    card = int((est.total - saved / 2) / memory.FITS_SHARE)  # over the line by half what checkpointing saves
    fit = memory.judge(est, card)
    assert fit.verdict == "tight" and "turn on gradient checkpointing" in fit.advice
    assert memory.judge(checkpointed, card, gradient_checkpointing=True).verdict == "fits"
    far = int((est.total - 2 * est.activations) / memory.FITS_SHARE)  # over by twice all the activations
    advice = memory.judge(est, far).advice
    assert "checkpointing" not in advice and "sequence length" not in advice and "lower the rank" in advice


def test_on_several_gpus_each_holds_the_whole_run_plus_ddp_gradient_buckets(default_model):
    tree = inventory.build(default_model.model)
    plan = LoraPlan(targets=tuple(inventory.select(tree, "all-linear")), rank=16, alpha=32)
    counts = count(tree, plan)
    one = memory.estimate(tree, plan, counts, batch_size=8, seq_len=1024)
    each_of_two = memory.estimate(tree, plan, counts, batch_size=8, seq_len=1024, gpus=2)
    assert each_of_two.weights == one.weights and each_of_two.optimizer == one.optimizer
    assert each_of_two.gradients == 2 * one.gradients  # the gradients and DDP's all-reduce buckets
    assert each_of_two.activations == one.activations  # its own micro-batch, on the chunked loss as well


def test_under_fsdp_each_gpu_holds_a_slice_of_the_base_and_adapter_state_and_the_weights_it_gathers(default_model):
    tree = inventory.build(default_model.model)
    plan = LoraPlan(targets=tuple(inventory.select(tree, "all-linear")), rank=16, alpha=32)
    counts = count(tree, plan)
    ddp = memory.estimate(tree, plan, counts, batch_size=8, seq_len=1024, gpus=4)
    ddp_own_loss = memory.estimate(tree, plan, counts, batch_size=8, seq_len=1024, gpus=4, chunked_loss=False)
    fsdp = memory.estimate(tree, plan, counts, batch_size=8, seq_len=1024, gpus=4, sharded=True)
    config = default_model.model.config
    layer = sum(p.numel() for p in default_model.model.model.layers[0].parameters())
    gathered = (2 * layer + config.vocab_size * config.hidden_size) * 2  # two layers and the head, in bf16
    assert fsdp.weights == pytest.approx(ddp.weights / 4 + gathered, abs=1)
    assert (fsdp.adapter, fsdp.optimizer) == pytest.approx((ddp.adapter / 4, ddp.optimizer / 4), abs=1)
    assert fsdp.gradients == pytest.approx(ddp.gradients / 8, abs=1)  # a slice, and no DDP buckets
    assert fsdp.activations == ddp_own_loss.activations  # its own micro-batch, on the model's own loss
    assert ddp.activations < ddp_own_loss.activations
    assert fsdp.total < ddp_own_loss.total  # (on this small model the chunked loss saves more than sharding)


@pytest.mark.parametrize("heads, kv_heads, targets", [(8, 2, "all-linear"), (4, 4, "attention")])
def test_activations_are_what_autograd_keeps_in_a_lora_forward(heads, kv_heads, targets):
    """The estimate's activations against the tensors torch's saved_tensors_hooks see (parameters aside) in a real
    PEFT LoRA forward of a small Llama under bf16 autocast, as the engine runs it (PEFT's input cast off): norms,
    attention, the gated MLP, the adapters' shared inputs. The targets include every layer's attention, so that
    gradients reach the first layer too."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from studio.core.model.plan import to_peft_config

    config = LlamaConfig(hidden_size=32 * heads, intermediate_size=600, num_hidden_layers=2, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    tree = inventory.build(model)
    plan = LoraPlan(targets=tuple(inventory.select(tree, targets)), rank=4, alpha=8, dropout=0.0)
    batch, seq = 2, 64
    estimated = memory.estimate(tree, plan, count(tree, plan), batch_size=batch, seq_len=seq).activations
    estimated -= min(batch * seq * 256, memory.LOSS_CHUNK_ELEMENTS) * 8  # the loss's chunk: the decoder alone below
    from peft.helpers import disable_input_dtype_casting

    peft_model = get_peft_model(model, to_peft_config(plan, tree))
    weights = {p.untyped_storage().data_ptr() for p in peft_model.parameters()}
    kept: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with (disable_input_dtype_casting(peft_model),  # as the engine trains under autocast
          torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), torch.autocast("cpu", torch.bfloat16)):
        peft_model.get_base_model().model(input_ids=torch.randint(0, 256, (batch, seq)), use_cache=False)
    assert sum(kept.values()) == pytest.approx(estimated, rel=0.05)
