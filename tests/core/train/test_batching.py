"""Which examples each step trains on: every example once per epoch across processes, and a pure function of
(seed, step) so that a resumed run picks up exactly where it stopped."""

from __future__ import annotations

import torch

from studio.core.train.batching import Batches


def _collate(examples: list[int]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[e, e] for e in examples])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _batches(examples, rank=0, world=1, accumulation=1, seed=3):
    return Batches(examples, _collate, batch_size=2, accumulation=accumulation, world=world, rank=rank, seed=seed,
                   is_lm=False)


def _picked(batches: Batches, step: int) -> list[int]:
    return [int(row[0]) for micro in batches.for_step(step).micro for row in micro["input_ids"]]


def test_each_epoch_trains_distinct_examples_across_processes_and_reshuffles():
    examples = list(range(10))  # 2 processes x batch 2: two steps an epoch, two examples wait for the next order
    ranks = [_batches(examples, rank=r, world=2) for r in (0, 1)]
    first_epoch = [e for step in (0, 1) for b in ranks for e in _picked(b, step)]
    second_epoch = [e for step in (2, 3) for b in ranks for e in _picked(b, step)]
    assert len(set(first_epoch)) == len(first_epoch) == 8
    assert len(set(second_epoch)) == 8
    assert first_epoch != second_epoch  # a new order each epoch
    assert ranks[0].epoch_at(2) == 1.0


def test_a_step_is_the_same_whether_reached_by_walking_or_asked_for_directly():
    walked = _batches(list(range(23)), accumulation=3)
    for step in range(7):
        walked_picks = _picked(walked, step)
    direct = _batches(list(range(23)), accumulation=3)
    assert _picked(direct, 6) == walked_picks
    assert _picked(_batches(list(range(23)), accumulation=3, seed=4), 6) != walked_picks


def test_token_counts_cover_every_micro_batch():
    batch = _batches(list(range(8)), accumulation=2).for_step(0)
    assert len(batch.micro) == 2
    assert batch.tokens == 2 * 2 * 2  # two micro-batches of two rows of two tokens


def test_a_packed_step_counts_its_real_tokens_and_the_positions_computed():
    from studio.core.data.dataset import Example, collate, pack

    rows = pack([Example(tuple(range(1, n + 1)), tuple(range(1, n + 1)), n) for n in (5, 9, 3, 7, 6)], 16)
    assert [len(row.input_ids) for row in rows] == [14, 16]
    batch = Batches(rows, lambda examples: collate(examples, 0), batch_size=2, accumulation=1, world=1, rank=0,
                    seed=0, is_lm=True).for_step(0)
    assert (batch.tokens, batch.positions) == (30, 32)  # two rows of 16 computed, two padding positions
