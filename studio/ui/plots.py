"""Live training curves (pyqtgraph's scrollingPlots idiom): long-lived curve items over numpy buffers that
grow by doubling; events only append, and a ~20 Hz timer hands the buffers that changed to their curves.
Downsampling ('peak') and clip-to-view keep a long run as cheap to draw as a short one.

The plot widgets are built the first time the plots are shown: a pyqtgraph plot carries a large object graph
(its context menu alone is dozens of widgets), and a window whose Train tab is never opened needs none."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QTimer, Slot
from PySide6.QtGui import QHideEvent, QShowEvent
from PySide6.QtWidgets import QDoubleSpinBox, QGraphicsItem, QGridLayout, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from studio.core import events as ev

pg.setConfigOptions(background="w", foreground="#303030", antialias=True)

REDRAW_MS = 50
DEFAULT_SMOOTHING = 0.6
RAW_COLOUR, SMOOTH_COLOUR, VAL_COLOUR, LINE_COLOUR = "#9ecae1", "#1f5fa8", "#d9480f", "#2b8a3e"
PALETTE = ("#1f5fa8", "#d9480f", "#2b8a3e", "#7048e8", "#c2255c", "#0c8599", "#e67700", "#5c940d")
MIB = 2**20
AXIS_WIDTH = 80  # room for the label and ticks like 0.00175; wider ones would be hidden
DOTS_UP_TO = 40  # points; longer curves are lines only (thousands of dots would be slow to paint)


class SeriesBuffer:
    """(x, y) points in arrays that double when full: appending is amortised O(1) and the views are free."""

    def __init__(self, capacity: int = 256) -> None:
        self._data = np.empty((2, capacity))
        self.size = 0

    @property
    def x(self) -> np.ndarray:
        return self._data[0, : self.size]

    @property
    def y(self) -> np.ndarray:
        return self._data[1, : self.size]

    def append(self, x: float, y: float) -> None:
        if self.size == self._data.shape[1]:
            grown = np.empty((2, 2 * self.size))
            grown[:, : self.size] = self._data[:, : self.size]
            self._data = grown
        self._data[:, self.size] = (x, y)
        self.size += 1

    def truncate_after(self, x: float) -> None:
        """Drop the points past `x` (a run resumed from an earlier checkpoint redoes those steps)."""
        self.size = int(np.searchsorted(self.x, x, side="right"))

    def clear(self) -> None:
        self.size = 0


class LiveCurve:
    """A buffer and, once attached to a plot, the curve item that shows it; `redraw` copies the points over only
    when they changed."""

    def __init__(self, name: str, colour: str, width: float = 2, symbol: str | None = None) -> None:
        self.buffer = SeriesBuffer()
        self.name, self.colour, self.width, self.symbol = name, colour, width, symbol
        self.item: pg.PlotDataItem | None = None
        self.dirty = False

    def attach(self, plot: pg.PlotItem) -> None:
        self.item = plot.plot(pen=pg.mkPen(self.colour, width=self.width), name=self.name, symbol=self.symbol,
                              symbolSize=7, symbolBrush=self.colour, symbolPen=None)
        self.item.setDownsampling(auto=True, method="peak")
        self.item.setClipToView(True)
        self.dirty = True

    def append(self, x: float, y: float) -> None:
        self.buffer.append(x, y)
        self.dirty = True

    def truncate_after(self, x: float) -> None:
        self.buffer.truncate_after(x)
        self.dirty = True

    def clear(self) -> None:
        self.buffer.clear()
        self.dirty = True

    def redraw(self) -> None:
        if self.dirty and self.item is not None:
            if self.symbol is None:  # dots while the curve is short: a line through one point draws nothing
                dots = "o" if self.buffer.size <= DOTS_UP_TO else None
                if self.item.opts["symbol"] != dots:
                    self.item.setSymbol(dots)
                    self.item.setSymbolSize(4)
            self.item.setData(self.buffer.x.copy(), self.buffer.y.copy())
            self.dirty = False


def smoothed(values: np.ndarray, smoothing: float) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average, debiased so that it starts at the first value."""
    out = np.empty_like(values, dtype=float)
    average = 0.0
    for i, value in enumerate(values):
        average = smoothing * average + (1 - smoothing) * float(value)
        out[i] = average / (1 - smoothing ** (i + 1))
    return out


class StepAxis(pg.AxisItem):
    """An axis of whole steps: zoomed in, it shows 1, 2, 3 rather than 1.5 or 2.25."""

    def tickValues(self, minVal: float, maxVal: float, size: float) -> list:  # noqa: N802, N803 - pyqtgraph's names
        levels = []
        for spacing, values in super().tickValues(minVal, maxVal, size):
            whole = [v for v in values if abs(v - round(v)) < 1e-9]
            if whole:
                levels.append((max(spacing, 1.0), whole))
        return levels


def step_plot(title: str, left: str) -> pg.PlotWidget:
    """A plot against the step that stays cheap to repaint while a run trains: axes of fixed width (tick labels
    of another width would re-lay out the plot), painted from a pixmap cache (their text is slow to draw)."""
    widget = pg.PlotWidget(axisItems={"bottom": StepAxis("bottom")})
    item = widget.getPlotItem()
    item.setTitle(title, size="10pt")
    item.setLabel("left", left)
    item.setLabel("bottom", "step")
    item.showGrid(x=True, y=True, alpha=0.2)
    item.setMenuEnabled(False)
    item.getAxis("left").setWidth(AXIS_WIDTH)
    item.getAxis("left").enableAutoSIPrefix(False)  # "loss (x0.001)" reads worse than 0.6
    for name in ("left", "bottom"):
        item.getAxis(name).setCacheMode(QGraphicsItem.DeviceCoordinateCache)
    widget.setMinimumSize(120, 140)
    return widget


def efficiency_text(metrics: ev.StepMetrics) -> str:
    """'· 97% of positions real', or '' where the step did not report it (real tokens/s: the progress row)."""
    return f"· {metrics.token_efficiency:.0%} of positions real" if metrics.token_efficiency is not None else ""


class TrainingPlots(QWidget):
    """Loss (raw, smoothed, validation), learning rate, gradient norm and GPU memory against the step."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.loss_raw = LiveCurve("train", RAW_COLOUR, width=1)
        self.loss_smooth = LiveCurve("train (smoothed)", SMOOTH_COLOUR)
        self.val_loss = LiveCurve("validation", VAL_COLOUR, symbol="o")
        self.lr = LiveCurve("lr", LINE_COLOUR)
        self.grad_norm = LiveCurve("grad norm", LINE_COLOUR)
        self.memory = LiveCurve("memory", LINE_COLOUR)
        self.curves = (self.loss_raw, self.loss_smooth, self.val_loss, self.lr, self.grad_norm, self.memory)
        self.widgets: tuple[pg.PlotWidget, ...] = ()  # loss, lr, grad norm, memory, once built
        self._total_steps = 1
        self._gpu_seen = False
        self._average = 0.0  # the running (biased) average behind the smoothed curve

        self.memory_label = QLabel("GPU memory: not measured yet")
        self.memory_label.setMinimumWidth(40)  # elided by the layout rather than widening the panel
        self.efficiency_label = QLabel("")
        self.efficiency_label.setToolTip("The share of the positions the model computed that held real tokens: "
                                         "padding lowers it, packing raises it")
        self.efficiency_label.setMinimumWidth(40)
        self.smoothing_spin = QDoubleSpinBox()
        self.smoothing_spin.setRange(0.0, 0.99)
        self.smoothing_spin.setSingleStep(0.05)
        self.smoothing_spin.setValue(DEFAULT_SMOOTHING)
        self.smoothing_spin.setToolTip("Weight of the past in the smoothed loss (an exponential moving average)")
        self.smoothing_spin.valueChanged.connect(self._on_smoothing_value_changed)
        header = QHBoxLayout()
        header.addWidget(self.memory_label)
        header.addWidget(self.efficiency_label)
        header.addStretch(1)
        header.addWidget(QLabel("Smoothing"))
        header.addWidget(self.smoothing_spin)
        self.grid = QGridLayout()
        self.grid.setContentsMargins(0, 0, 0, 0)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(header)
        layout.addLayout(self.grid, 1)

        self.timer = QTimer(self)
        self.timer.setInterval(REDRAW_MS)
        self.timer.timeout.connect(self.redraw)

    @property
    def memory_widget(self) -> pg.PlotWidget:
        return self.widgets[3]

    @property
    def smoothing(self) -> float:
        return float(self.smoothing_spin.value())

    # ---- building -------------------------------------------------------------------------------------------

    def showEvent(self, event: QShowEvent) -> None:  # noqa: N802 - Qt's name
        super().showEvent(event)
        if not self.widgets:
            self._build_plots()
        self.redraw()
        self.timer.start()

    def hideEvent(self, event: QHideEvent) -> None:  # noqa: N802
        super().hideEvent(event)
        self.timer.stop()  # a hidden plot has nothing to redraw; the buffers keep filling

    def _build_plots(self) -> None:
        loss, lr, grad, memory = self.widgets = (
            step_plot("Loss", "loss"), step_plot("Learning rate", "lr"),
            step_plot("Gradient norm", "norm before clipping"), step_plot("GPU memory (peak per step)", "MiB"),
        )
        loss.getPlotItem().addLegend(offset=(-10, 10))
        for curve, widget in ((self.loss_raw, loss), (self.loss_smooth, loss), (self.val_loss, loss),
                              (self.lr, lr), (self.grad_norm, grad), (self.memory, memory)):
            curve.attach(widget.getPlotItem())
        self._show_memory_plot(self._gpu_seen)  # shown once a step reports GPU memory
        self.grid.addWidget(loss, 0, 0, 1, 2)
        self.grid.addWidget(lr, 1, 0)
        self.grid.addWidget(grad, 1, 1)
        self.grid.addWidget(memory, 2, 0, 1, 2)
        self.grid.setRowStretch(0, 3)
        self.grid.setRowStretch(1, 2)
        self.set_step_range(self._total_steps)

    def _show_memory_plot(self, shown: bool) -> None:
        self.memory_widget.setVisible(shown)
        self.grid.setRowStretch(2, 1 if shown else 0)  # a hidden row with stretch would leave a blank band

    # ---- data -----------------------------------------------------------------------------------------------

    def set_step_range(self, total_steps: int) -> None:
        """The x axis spans the whole run from the start (the curves grow into it, and the axes stay put)."""
        self._total_steps = max(1, total_steps)
        for widget in self.widgets:
            plot = widget.getPlotItem()  # not x-linked: linked views align by pixels, and these differ in width
            plot.enableAutoRange(x=False)
            plot.setXRange(0, self._total_steps, padding=0.02)

    def add_step(self, metrics: ev.StepMetrics) -> None:
        step = float(metrics.step)
        self.loss_raw.append(step, metrics.loss)
        s = self.smoothing
        self._average = s * self._average + (1 - s) * metrics.loss
        self.loss_smooth.append(step, self._average / (1 - s ** self.loss_raw.buffer.size))
        self.lr.append(step, metrics.lr)
        self.grad_norm.append(step, metrics.grad_norm)
        self.efficiency_label.setText(efficiency_text(metrics))
        if metrics.gpu_mem_bytes is None:
            self.memory_label.setText("CPU run: no GPU memory")
            return
        per_device = metrics.gpu_mem_per_device or ()
        each = f" (GPUs: {', '.join(f'{b / MIB:,.0f}' for b in per_device)} MiB)" if len(per_device) > 1 else ""
        self.memory_label.setText(f"GPU memory: {metrics.gpu_mem_bytes / MIB:,.0f} MiB peak in the last step{each}")
        self.memory.append(step, metrics.gpu_mem_bytes / MIB)
        if not self._gpu_seen:
            self._gpu_seen = True
            if self.widgets:
                self._show_memory_plot(True)

    def add_eval(self, metrics: ev.EvalMetrics) -> None:
        self.val_loss.append(float(metrics.step), metrics.val_loss)

    def truncate_after(self, step: int) -> None:
        for curve in self.curves:
            curve.truncate_after(step)
        self._recompute_smoothed()

    def clear(self) -> None:
        for curve in self.curves:
            curve.clear()
        self._average = 0.0

    @Slot()
    def redraw(self) -> None:
        for curve in self.curves:
            curve.redraw()

    @Slot(float)
    def _on_smoothing_value_changed(self, _value: float) -> None:
        self._recompute_smoothed()

    def _recompute_smoothed(self) -> None:
        raw = self.loss_raw.buffer
        values = smoothed(raw.y, self.smoothing)
        self.loss_smooth.clear()
        for x, y in zip(raw.x, values):
            self.loss_smooth.append(float(x), float(y))
        s = self.smoothing
        self._average = float(values[-1]) * (1 - s**raw.size) if raw.size else 0.0
