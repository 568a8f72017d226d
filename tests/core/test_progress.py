"""One progress type; a sub-task's 0..1 is given its share of the parent's bar by `scaled`."""

from __future__ import annotations

import dataclasses

import pytest

from studio.core.progress import Progress, scaled


def test_a_scaled_sub_task_fills_its_share_of_the_parent_and_keeps_its_messages():
    heard: list[Progress] = []
    sub = scaled(heard.append, 0.2, 0.8)
    for fraction in (0.0, 0.5, 1.0):
        sub(Progress("write", fraction, f"at {fraction}"))
    assert [(p.stage, p.message) for p in heard] == [("write", "at 0.0"), ("write", "at 0.5"), ("write", "at 1.0")]
    assert [p.fraction for p in heard] == pytest.approx([0.2, 0.5, 0.8])


def test_a_finished_sub_task_lands_exactly_on_its_end():
    heard: list[Progress] = []
    scaled(heard.append, 0.3, 0.9)(Progress("write", 1.0, "Wrote the last tensor"))
    assert heard[0].fraction == 0.9  # 0.3 + 0.6 * 1.0 would be 0.9000000000000001, past the next stage's 0.9


def test_scaling_nests_and_can_name_the_sub_task_as_one_stage():
    heard: list[Progress] = []
    inner = scaled(scaled(heard.append, 0.5, 1.0), 0.0, 0.5, stage="open")  # the first half of the second half
    inner(Progress("weights", 1.0, "Reading the weights"))
    assert heard == [Progress("open", 0.75, "Reading the weights")]


def test_progress_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Progress("merge", 0.0, "").fraction = 1.0  # type: ignore[misc]
