"""Token lengths of the training rows as a histogram, with the maximum length as a dashed line: the rows over it in
another colour, and the line's label saying what becomes of them (split into windows, cut, left out). Built on
first show (see plots.py on why)."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtGui import QShowEvent
from PySide6.QtWidgets import QVBoxLayout, QWidget

from studio.ui.plots import PALETTE

MAX_BINS = 50
LINE_COLOUR = "#c62828"
OVER_COLOUR = "#f08c00"


class LengthHistogram(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.plot_widget: pg.PlotWidget | None = None
        self.lengths = np.zeros(0, dtype=int)
        self.max_length = 0
        self.fate = "cut"  # what becomes of the rows over max_length
        self.setMinimumHeight(120)
        QVBoxLayout(self).setContentsMargins(0, 0, 0, 0)

    def show_lengths(self, lengths: np.ndarray, max_length: int, fate: str = "cut") -> None:
        """`fate`: what becomes of the rows over max_length, in a few words ("split into windows")."""
        self.lengths, self.max_length, self.fate = np.asarray(lengths), max_length, fate
        self._draw()

    def showEvent(self, event: QShowEvent) -> None:  # noqa: N802 - Qt's name
        super().showEvent(event)
        if self.plot_widget is None:
            self._build()
            self._draw()

    def _build(self) -> None:
        self.plot_widget = pg.PlotWidget()
        plot = self.plot_widget.getPlotItem()
        plot.setTitle("Tokens per training row", size="10pt")
        plot.setLabel("bottom", "tokens")
        plot.setLabel("left", "rows")
        plot.setMenuEnabled(False)
        plot.showGrid(x=False, y=True, alpha=0.2)
        self.bars = pg.BarGraphItem(x0=[], x1=[], height=[], brush=PALETTE[0], pen=pg.mkPen("w", width=1))
        plot.addItem(self.bars)
        self.over_bars = pg.BarGraphItem(x0=[], x1=[], height=[], brush=OVER_COLOUR, pen=pg.mkPen("w", width=1))
        plot.addItem(self.over_bars)
        self.max_line = pg.InfiniteLine(angle=90, pen=pg.mkPen(LINE_COLOUR, width=2, style=Qt.DashLine),
                                        label="max length", labelOpts={"position": 0.9, "color": LINE_COLOUR})
        plot.addItem(self.max_line)
        self.layout().addWidget(self.plot_widget)

    def _draw(self) -> None:
        if self.plot_widget is None:
            return
        lengths = self.lengths
        if not len(lengths):
            self.bars.setOpts(x0=[], x1=[], height=[])
            self.over_bars.setOpts(x0=[], x1=[], height=[])
            return
        low, high = int(lengths.min()), max(int(lengths.max()), self.max_length) + 1
        edges = np.histogram_bin_edges(lengths, bins=min(MAX_BINS, max(1, high - low)), range=(low, high))
        edges = np.union1d(edges, [self.max_length + 1]) if low <= self.max_length < high - 1 else edges
        fits, _ = np.histogram(lengths[lengths <= self.max_length], bins=edges)
        over, _ = np.histogram(lengths[lengths > self.max_length], bins=edges)
        self.bars.setOpts(x0=edges[:-1], x1=edges[1:], height=fits)
        self.over_bars.setOpts(x0=edges[:-1], x1=edges[1:], height=over)
        self.max_line.setValue(self.max_length)
        over_count = int((lengths > self.max_length).sum())
        self.max_line.label.setFormat(f"max length {self.max_length}" + (
            f": {over_count:,} longer, {self.fate}" if over_count else ""))
