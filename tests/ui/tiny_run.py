"""A training run small enough for the test suite, set up through the window's own controls: a few rows of the
built-in demo, q_proj and v_proj at rank 4, batch 2 of at most 72 tokens (the chat template alone is ~55)."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Callable

import pytest
from PySide6.QtCore import QCoreApplication, QEvent, QEventLoop, QTimer

from studio.core.data.dataset import DEMO_DIR

MAX_LENGTH = 72


@pytest.fixture()
def collect_dead_windows():
    """After the test, delete the windows it closed and collect their Python side now: pyqtgraph plots leave
    reference cycles, and a collection that ran later would stall whichever test is measuring the UI then."""
    yield
    QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)
    gc.collect()


def write_demo_rows(path: Path, rows: int) -> Path:
    lines = (DEMO_DIR / "train.jsonl").read_text().splitlines()[:rows]
    path.write_text("".join(json.dumps(json.loads(line)) + "\n" for line in lines))
    return path


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str = "the condition") -> None:
    """Run the real event loop (as the application does) until `predicate` holds."""
    loop = QEventLoop()
    poll = QTimer()
    poll.timeout.connect(lambda: predicate() and loop.quit())
    poll.start(20)
    deadline = QTimer()
    deadline.setSingleShot(True)
    deadline.timeout.connect(loop.quit)
    deadline.start(int(timeout_s * 1000))
    if not predicate():
        loop.exec()
    poll.stop()
    deadline.stop()
    assert predicate(), f"timed out after {timeout_s:.0f} s waiting for {what}"


def configure_tiny_run(window, data_file: Path, runs_dir: Path, steps: int, *, val_fraction: float = 0.0,
                       save_every: int = 0, eval_every: int = 0) -> None:
    """Point every panel of `window` at the tiny run and wait until the data panel has analysed the file."""
    data = window.data_panel
    window.show_panel(data)  # the panel analyses the data while it is shown
    data.open_file(data_file)
    if val_fraction:
        data.split_combo.setCurrentIndex(data.split_combo.findData("fraction"))
        data.fraction_spin.setValue(val_fraction)
    tree = window.plan_state.tree
    window.plan_state.replace_selection(n for n in tree.targetable if n.endswith((".q_proj", ".v_proj")))
    window.plan_state.update(rank=4, alpha=8.0)
    form = window.train_panel.form
    form.max_steps.setValue(steps)
    form.batch_size.setValue(2)
    form.max_length.setValue(MAX_LENGTH)
    form.learning_rate.setValue(2e-3)
    form.warmup.setValue(0.0)
    form.eval_every.setValue(eval_every)
    form.eval_examples.setValue(0)
    form.save_every.setValue(save_every)
    form.spectrum_every.setValue(1)
    window.train_panel.set_runs_dir(runs_dir)

    def analysed() -> bool:
        analysis = data.analysis
        return (analysis is not None and analysis.prepared is not None and not data.jobs.is_busy()
                and analysis.spec == data.spec() and not data._refresh_timer.isActive())

    wait_until(analysed, 60, "the data panel to analyse the tiny data")


class Heartbeat:
    """A 10 ms timer on the UI thread; the gaps between its beats are how long the window could not react."""

    def __init__(self, interval_ms: int = 10) -> None:
        self.beats: list[float] = []
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._beat)

    def _beat(self) -> None:
        self.beats.append(time.perf_counter())

    def start(self) -> None:
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()

    def gaps(self, start: float = 0.0, end: float = float("inf")) -> list[tuple[float, float]]:
        """(gap in seconds, when it began) for the beats between `start` and `end` (perf_counter times)."""
        beats = [b for b in self.beats if start <= b <= end]
        return [(b - a, a) for a, b in zip(beats, beats[1:])]
