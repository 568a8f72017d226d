"""Packing by best-fit decreasing: packs filled to 95% and more on a realistic mix of lengths, a function of the
lengths and the seed, every example in exactly one pack, whole."""

from __future__ import annotations

import numpy as np
import pytest

from studio.core.data.examples import IGNORE_INDEX, Example, ExampleTable, best_fit_decreasing, pack


def lognormal_lengths(count: int, seed: int = 0) -> np.ndarray:
    """The variable-length benchmark's rows: token lengths lognormal around a median of 256, within [16, 1000]."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(256), 0.8, count).astype(np.int64), 16, 1000)


def in_file_order(lengths: np.ndarray, capacity: int) -> int:
    """Packs that joining consecutive examples makes (a pack closes when the next example does not fit)."""
    packs, filled = 1, 0
    for n in lengths.tolist():
        if filled and filled + n > capacity:
            packs, filled = packs + 1, 0
        filled += n
    return packs


@pytest.mark.parametrize("count", [480, 1440, 20_000])
def test_best_fit_decreasing_fills_packs_to_95_percent_of_1024(count):
    lengths = lognormal_lengths(count)
    bins = best_fit_decreasing(lengths, 1024, seed=0)
    assert all(int(lengths[b].sum()) <= 1024 for b in bins)
    assert lengths.sum() / (len(bins) * 1024) >= 0.95
    assert lengths.sum() / (in_file_order(lengths, 1024) * 1024) < 0.85  # what file order gave


def test_packs_are_a_function_of_the_lengths_and_the_seed():
    lengths = lognormal_lengths(2000)
    first = best_fit_decreasing(lengths, 1024, seed=3)
    assert [b.tolist() for b in first] == [b.tolist() for b in best_fit_decreasing(lengths, 1024, seed=3)]
    assert [b.tolist() for b in first] != [b.tolist() for b in best_fit_decreasing(lengths, 1024, seed=4)]


def test_every_example_is_in_exactly_one_pack_whole_with_its_own_positions():
    lengths = lognormal_lengths(300, seed=1) // 8  # 2 to 125 tokens, packed into 128
    examples = [Example(tuple(range(1000 * i, 1000 * i + n)), tuple(range(1000 * i, 1000 * i + n)), n)
                for i, n in enumerate(lengths.tolist())]
    packed = pack(ExampleTable.of(examples), 128, seed=0)
    pieces = []
    for row in packed:
        assert len(row.input_ids) <= 128
        starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
        for start, end in zip(starts, starts[1:]):
            piece = row.input_ids[start:end]
            assert row.position_ids[start:end] == tuple(range(end - start))
            assert row.labels[start] == IGNORE_INDEX and row.labels[start + 1:end] == piece[1:]
            pieces.append(piece)
    assert sorted(pieces) == sorted(e.input_ids for e in examples)
    assert sum(len(row.input_ids) for row in packed) / (len(packed) * 128) >= 0.95


def test_an_example_longer_than_a_pack_stays_alone():
    bins = best_fit_decreasing(np.array([300, 20, 100, 30]), 128)
    assert [sorted(b.tolist()) for b in bins] == [[0], [1, 2], [3]]
