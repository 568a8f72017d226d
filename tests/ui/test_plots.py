"""The training plots: whole steps only on the step axis, whatever the zoom; the header's live figures."""

from __future__ import annotations

from studio.core import events as ev
from studio.ui.plots import StepAxis, TrainingPlots, step_plot


def test_a_short_run_gets_whole_step_ticks_only(qtbot):
    widget = step_plot("Loss", "loss")
    qtbot.addWidget(widget)
    axis = widget.getPlotItem().getAxis("bottom")
    assert isinstance(axis, StepAxis)
    levels = axis.tickValues(0.8, 4.2, 600)  # wide enough for pyqtgraph to want ticks every 0.5 and 0.1
    ticks = sorted(v for _, values in levels for v in values)
    assert ticks == [1.0, 2.0, 3.0, 4.0]
    assert all(spacing >= 1 for spacing, _ in levels)


def test_a_long_run_keeps_pyqtgraph_s_own_spacing(qtbot):
    widget = step_plot("Loss", "loss")
    qtbot.addWidget(widget)
    levels = widget.getPlotItem().getAxis("bottom").tickValues(0, 1000, 600)
    major_spacing, major = levels[0]
    assert major_spacing >= 100 and major[:3] == [0.0, major_spacing, 2 * major_spacing]


def test_the_header_shows_the_share_of_real_positions(qtbot):
    plots = TrainingPlots()
    qtbot.addWidget(plots)
    step = ev.StepMetrics(step=1, total_steps=10, epoch=0.1, loss=2.0, lr=1e-4, grad_norm=1.0, tokens_per_s=38250.4,
                          tokens_seen=8000, elapsed_s=0.2, eta_s=1.8, token_efficiency=0.9712)
    plots.add_step(step)
    assert plots.efficiency_label.text() == "· 97% of positions real"
    assert plots.memory_label.text() == "CPU run: no GPU memory"
