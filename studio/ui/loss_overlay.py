"""The Runs tab's plot: the loss curves of the ticked runs overlaid, training as a line and validation dashed
with squares, one colour per run, the selected run's curves bold and on top.

Building a pyqtgraph curve costs milliseconds on the UI thread whatever its length (the item, its place in the
scene, its legend entry). So the overlay keeps the curves it has built and only restyles them when the ticks or
the selection change, and builds at most NEW_PER_TURN new ones per turn of the event loop: ticking many long
runs never holds the window for long.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyqtgraph as pg
from PySide6.QtCore import QObject, Qt, QTimer, Slot

from studio.core.train.run_folder import RunCurves
from studio.ui.plots import DOTS_UP_TO, step_plot

NEW_PER_TURN = 2
WIDTH, SELECTED_WIDTH = 1.5, 3.0  # the selected run's curves stand out


@dataclass(frozen=True)
class Overlaid:
    """One run as the overlay shows it."""

    folder: str
    name: str
    curves: RunCurves
    colour: str
    selected: bool

    @property
    def width(self) -> float:
        return SELECTED_WIDTH if self.selected else WIDTH


class LossOverlay(QObject):
    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.widget: pg.PlotWidget | None = None  # built when the panel is first shown (see plots.py on why)
        self.curves: dict[str, pg.PlotDataItem] = {}  # training loss, by run folder
        self.val_curves: dict[str, pg.PlotDataItem] = {}  # validation loss, by run folder
        self._drawn: dict[str, Overlaid] = {}
        self._wanted: list[Overlaid] = []
        self._more = QTimer(self)  # the curves left for the next turn
        self._more.setSingleShot(True)
        self._more.setInterval(0)
        self._more.timeout.connect(self._update)

    def build(self) -> pg.PlotWidget:
        self.widget = step_plot("Loss of the ticked runs: training (line), validation (dashed, ■)", "loss")
        plot = self.widget.getPlotItem()
        plot.addLegend(offset=(-10, 10))
        plot.setDownsampling(auto=True, mode="peak")  # a long run paints as fast as a short one (plots.py)
        plot.setClipToView(True)
        self._update()
        return self.widget

    def show(self, runs: list[Overlaid]) -> None:
        """Show these runs' curves (in this order in the legend, as far as new ones go), and no others."""
        self._wanted = list(runs)
        self._update()

    @Slot()
    def _update(self) -> None:
        if self.widget is None:
            return
        wanted = {run.folder: run for run in self._wanted}
        for folder, drawn in list(self._drawn.items()):
            if folder not in wanted or wanted[folder].curves is not drawn.curves:  # unticked, or read again
                self._remove(folder)
        built = 0
        for run in self._wanted:
            if run.folder in self._drawn:
                self._restyle(run)
            elif built < NEW_PER_TURN:
                self._build(run)
                built += 1
            else:
                self._more.start()

    def _build(self, run: Overlaid) -> None:
        plot = self.widget.getPlotItem()  # type: ignore[union-attr] - built before any curve
        steps, losses = zip(*run.curves.losses) if run.curves.losses else ((), ())
        self.curves[run.folder] = plot.plot(
            list(steps), list(losses), pen=pg.mkPen(run.colour, width=run.width), name=run.name,
            symbol="o" if len(steps) <= DOTS_UP_TO else None, symbolSize=4, symbolBrush=run.colour, symbolPen=None)
        if run.curves.val_losses:
            val_steps, val_losses = zip(*run.curves.val_losses)
            self.val_curves[run.folder] = plot.plot(
                list(val_steps), list(val_losses), pen=pg.mkPen(run.colour, width=run.width, style=Qt.DashLine),
                symbol="s", symbolSize=7, symbolBrush=run.colour, symbolPen=None)
        self._drawn[run.folder] = run
        self._raise(run)

    def _restyle(self, run: Overlaid) -> None:
        drawn = self._drawn[run.folder]
        if (drawn.colour, drawn.selected) == (run.colour, run.selected):
            return
        self.curves[run.folder].setPen(pg.mkPen(run.colour, width=run.width))
        self.curves[run.folder].setSymbolBrush(run.colour)
        val = self.val_curves.get(run.folder)
        if val is not None:
            val.setPen(pg.mkPen(run.colour, width=run.width, style=Qt.DashLine))
            val.setSymbolBrush(run.colour)
        self._drawn[run.folder] = run
        self._raise(run)

    def _raise(self, run: Overlaid) -> None:
        for item in (self.curves.get(run.folder), self.val_curves.get(run.folder)):
            if item is not None:
                item.setZValue(1 if run.selected else 0)

    def _remove(self, folder: str) -> None:
        plot = self.widget.getPlotItem()  # type: ignore[union-attr]
        plot.removeItem(self.curves.pop(folder))
        val = self.val_curves.pop(folder, None)
        if val is not None:
            plot.removeItem(val)
        del self._drawn[folder]
