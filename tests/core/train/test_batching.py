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
    assert sorted(len(row.input_ids) for row in rows) == [14, 16]
    batch = Batches(rows, lambda examples: collate(examples, 0), batch_size=2, accumulation=1, world=1, rank=0,
                    seed=0, is_lm=True).for_step(0)
    assert (batch.tokens, batch.positions) == (30, 32)  # two rows of 16 computed, two padding positions


def _lengths_collate(examples: list[int]) -> dict[str, torch.Tensor]:
    ids = torch.tensor(examples)[:, None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _grouped(lengths, batch_size, world=1, rank=0, seed=5):
    return Batches(list(range(len(lengths))), _lengths_collate, batch_size=batch_size, accumulation=1, world=world,
                   rank=rank, seed=seed, is_lm=False, lengths=lengths)


def _rows(batches: Batches, step: int) -> list[int]:
    return [int(i) for micro in batches.for_step(step).micro for i in micro["input_ids"][:, 0]]


def test_length_grouped_batches_train_each_example_once_an_epoch_with_little_padding():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 1000, (4096,), generator=generator).tolist()
    grouped, plain = _grouped(lengths, 8), Batches(list(range(4096)), _lengths_collate, batch_size=8, accumulation=1,
                                                   world=1, rank=0, seed=5, is_lm=False)
    steps = [_rows(grouped, step) for step in range(512)]
    assert sorted(i for rows in steps for i in rows) == list(range(4096))  # one epoch: every example once

    def padding(rows_of_steps) -> float:  # the share of a batch that pads each row to the longest
        widths = [max(lengths[i] for i in rows) * len(rows) for rows in rows_of_steps]
        return 1 - sum(lengths[i] for rows in rows_of_steps for i in rows) / sum(widths)

    assert padding(steps) < 0.03 < 0.3 < padding([_rows(plain, step) for step in range(512)])
    assert steps[:4] != sorted(steps[:4], key=lambda rows: -max(lengths[i] for i in rows))  # blocks shuffled
    assert _rows(grouped, 512) != steps[0]  # the next epoch draws a new order


def test_length_grouped_steps_depend_on_seed_and_step_only_and_split_across_processes():
    lengths = [(i * 37) % 211 + 1 for i in range(300)]
    walked = _grouped(lengths, 4)
    for step in range(9):
        walked_rows = _rows(walked, step)
    assert _rows(_grouped(lengths, 4), 8) == walked_rows
    assert _rows(_grouped(lengths, 4, seed=6), 8) != walked_rows
    two = [_grouped(lengths, 2, world=2, rank=rank) for rank in (0, 1)]
    for step in (0, 7, 80):  # two processes at batch 2 train one process's batch of 4, split between them
        assert _rows(two[0], step) + _rows(two[1], step) == _rows(_grouped(lengths, 4), step)
