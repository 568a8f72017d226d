"""The step axis of the training plots: whole steps only, whatever the zoom."""

from __future__ import annotations

from studio.ui.plots import StepAxis, step_plot


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
