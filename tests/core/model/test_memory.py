from __future__ import annotations

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
    own_loss = memory.estimate(tree, plan, counts, batch_size=4, seq_len=512, chunked_loss=False)
    bigger = memory.estimate(tree, plan, counts, batch_size=8, seq_len=512, chunked_loss=False)
    assert bigger.activations == 2 * own_loss.activations  # with the model's own loss, everything grows per token


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


def test_on_several_gpus_each_holds_the_whole_run_plus_ddp_gradient_buckets_and_the_models_own_loss(default_model):
    tree = inventory.build(default_model.model)
    plan = LoraPlan(targets=tuple(inventory.select(tree, "all-linear")), rank=16, alpha=32)
    counts = count(tree, plan)
    one = memory.estimate(tree, plan, counts, batch_size=8, seq_len=1024, chunked_loss=False)
    each_of_two = memory.estimate(tree, plan, counts, batch_size=8, seq_len=1024, gpus=2)
    assert each_of_two.weights == one.weights and each_of_two.optimizer == one.optimizer
    assert each_of_two.gradients == 2 * one.gradients  # the gradients and DDP's all-reduce buckets
    assert each_of_two.activations == one.activations  # several GPUs train on the model's own loss
