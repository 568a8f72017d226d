"""The spectrum panel: how much of its rank each LoRA update uses, live from the run's SpectrumSnapshot events
or from a saved adapter.

A heatmap of layers × module kinds (q_proj, k_proj, ...) coloured by the 90%-energy effective rank or by the
share of the energy in the top singular value; singular-value curves of the modules ticked in the list; and
the core's rank advice in words."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Slot
from PySide6.QtGui import QShowEvent
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from studio.core import events as ev
from studio.core.adapters.spectrum import advise_ranks
from studio.core.events import ModuleSpectrum
from studio.ui.plots import PALETTE

LAYER_NUMBER = re.compile(r"\.(\d+)(?:\.|$)")
NO_LAYER = -1  # modules outside the numbered blocks (lm_head) get a row of their own
DEFAULT_CURVES = 4
MAX_LAYER_TICKS = 16
MAX_INDEX_TICKS = 8
METRICS = (("Effective rank (90%)", "rank"), ("Top-1 energy share", "top1"))


@dataclass(frozen=True)
class SpectrumGrid:
    """Module spectra laid out as rows (layers) × columns (module kinds); `values[row, col]` is NaN where a
    layer has no module of that kind."""

    layers: tuple[int, ...]
    kinds: tuple[str, ...]
    values: np.ndarray
    names: tuple[tuple[str | None, ...], ...]  # the module behind each cell

    @classmethod
    def of(cls, spectra: Sequence[ModuleSpectrum], metric: str) -> "SpectrumGrid":
        def layer(name: str) -> int:
            match = LAYER_NUMBER.search(name)
            return int(match.group(1)) if match else NO_LAYER

        kinds = tuple(dict.fromkeys(s.name.rsplit(".", 1)[-1] for s in spectra))
        layers = tuple(sorted({layer(s.name) for s in spectra}, key=lambda n: (n == NO_LAYER, n)))
        values = np.full((len(layers), len(kinds)), np.nan)
        names: list[list[str | None]] = [[None] * len(kinds) for _ in layers]
        for s in spectra:
            row, col = layers.index(layer(s.name)), kinds.index(s.name.rsplit(".", 1)[-1])
            values[row, col] = s.effective_rank_90 if metric == "rank" else s.top1_energy
            names[row][col] = s.name
        return cls(layers, kinds, values, tuple(tuple(r) for r in names))


def shared_suffix(kinds: Sequence[str]) -> str:
    """The ending all kinds share from an underscore on ("_proj" of q_proj, v_proj), when each keeps a name."""
    if len(kinds) < 2:
        return ""
    suffix = os.path.commonprefix([kind[::-1] for kind in kinds])[::-1]
    suffix = suffix[suffix.find("_"):] if "_" in suffix else ""
    return suffix if all(len(kind) > len(suffix) for kind in kinds) else ""


def short_name(name: str) -> str:
    """model.layers.7.self_attn.q_proj -> "7 q_proj": what tells modules of one run apart."""
    match = LAYER_NUMBER.search(name)
    kind = name.rsplit(".", 1)[-1]
    return f"{match.group(1)} {kind}" if match else name


def _default_curves(spectra: Sequence[ModuleSpectrum]) -> list[str]:
    """A few modules worth comparing: the first and the last layer of the first two kinds."""
    by_kind: dict[str, list[str]] = {}
    for s in spectra:
        by_kind.setdefault(s.name.rsplit(".", 1)[-1], []).append(s.name)
    chosen = [name for names in list(by_kind.values())[:2] for name in dict.fromkeys((names[0], names[-1]))]
    return chosen[:DEFAULT_CURVES]


class SpectrumPanel(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.spectra: tuple[ModuleSpectrum, ...] = ()  # the spectra on screen
        self._pending: tuple[tuple[ModuleSpectrum, ...], str] | None = None  # newer ones, for when it is shown
        self.grid: SpectrumGrid | None = None
        self.heatmap_widget: pg.PlotWidget | None = None  # the plots, built on first show
        self.curves_widget: pg.PlotWidget | None = None
        self.source_label = QLabel("No spectra yet: they arrive while a run trains, or load an adapter")
        self.source_label.setWordWrap(True)
        self.metric_combo = QComboBox()
        for text, key in METRICS:
            self.metric_combo.addItem(text, key)
        self.metric_combo.setToolTip("Effective rank: how many singular values hold 90% of the update's energy (sum "
                                     "of squares). Top-1 share: the largest one's part of it (1 = a rank-1 update)")
        self.metric_combo.currentIndexChanged.connect(self._on_metric_index_changed)

        self.curves: dict[str, pg.PlotDataItem] = {}
        self.module_list = QListWidget()
        self.module_list.setToolTip("Tick modules to draw their singular values")
        self.module_list.setMinimumWidth(120)
        self.module_list.itemChanged.connect(self._on_module_item_changed)
        self.advice_label = QLabel()
        self.advice_label.setWordWrap(True)
        self.advice_label.setTextInteractionFlags(Qt.TextSelectableByMouse)

        header = QHBoxLayout()
        header.addWidget(self.source_label, 1)
        header.addWidget(QLabel("Colour by"))
        header.addWidget(self.metric_combo)
        self.curves_side = QSplitter(Qt.Horizontal)
        self.curves_side.addWidget(self.module_list)
        self.split = split = QSplitter(Qt.Horizontal)
        split.addWidget(self.curves_side)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(header)
        layout.addWidget(split, 1)
        layout.addWidget(self.advice_label)

    # ---- building (on first show: see plots.py on why) ----------------------------------------------------------

    def showEvent(self, event: QShowEvent) -> None:  # noqa: N802 - Qt's name
        super().showEvent(event)
        if self.heatmap_widget is None:
            self._build_plots()
        self._show_pending()

    def _build_plots(self) -> None:
        self.heatmap_widget = pg.PlotWidget()
        self.heatmap_plot = self.heatmap_widget.getPlotItem()
        self.heatmap_plot.setMenuEnabled(False)
        self.heatmap_plot.setMouseEnabled(x=False, y=False)
        self.heatmap_plot.hideButtons()
        self.heatmap_plot.invertY(True)  # layer 0 at the top, like the module tree
        self.heatmap_plot.setLabel("left", "layer")
        self.heatmap_plot.setLabel("bottom", "module kind")
        self.image = pg.ImageItem(axisOrder="row-major")
        self.heatmap_plot.addItem(self.image)
        self.colour_bar = pg.ColorBarItem(values=(0, 1), colorMap=pg.colormap.get("viridis"), interactive=False,
                                          width=18)
        self.colour_bar.setImageItem(self.image, insert_in=self.heatmap_plot)
        self.curves_widget = pg.PlotWidget()
        self.curves_plot = self.curves_widget.getPlotItem()
        self.curves_plot.setMenuEnabled(False)
        self.curves_plot.setLogMode(x=False, y=True)
        self.curves_plot.setLabel("left", "singular value of ΔW")
        self.curves_plot.getAxis("left").enableAutoSIPrefix(False)
        self.curves_plot.setLabel("bottom", "index (largest first)")
        self.curves_plot.showGrid(x=True, y=True, alpha=0.2)
        self.curves_plot.addLegend(offset=(10, -10), labelTextSize="8pt")  # bottom left: below the largest values
        self.split.insertWidget(0, self.heatmap_widget)
        self.curves_side.addWidget(self.curves_widget)
        self.curves_side.setSizes([260, 600])
        self.split.setSizes([300, 560])

    @property
    def metric(self) -> str:
        return str(self.metric_combo.currentData())

    def checked_modules(self) -> list[str]:
        items = (self.module_list.item(i) for i in range(self.module_list.count()))
        return [item.data(Qt.UserRole) for item in items if item.checkState() == Qt.Checked]

    # ---- input ----------------------------------------------------------------------------------------------

    @Slot(object)
    def on_training_event(self, event: object) -> None:
        if isinstance(event, ev.SpectrumSnapshot):
            self.show_spectra(event.modules, f"Step {event.step} of the running adapter")
        elif isinstance(event, ev.RunStarted) and not event.start_step:
            self.clear()

    def show_spectra(self, spectra: Sequence[ModuleSpectrum], source: str) -> None:
        """Show these spectra now if the panel is visible, else when it is next shown (a hidden panel does no
        drawing while a run trains)."""
        self._pending = (tuple(spectra), source)
        if self.isVisible():
            self._show_pending()

    def _show_pending(self) -> None:
        if self._pending is None:
            return
        spectra, source = self._pending
        self._pending = None
        names_changed = [s.name for s in spectra] != [s.name for s in self.spectra]
        self.spectra = spectra
        self.source_label.setText(f"<b>{source}</b> · {len(self.spectra)} adapted modules")
        if names_changed:
            self._fill_module_list()
        self._draw_heatmap()
        self._draw_curves()
        report = advise_ranks(self.spectra)
        kinds = "; ".join(f"{k.name}: effective rank {k.effective_rank} of {k.rank}" for k in report.kinds
                          if k.verdict != "untrained")
        self.advice_label.setText(f"<b>Rank advice</b>: {report.summary}." + (f"<br>{kinds}" if kinds else ""))

    def clear(self) -> None:
        self.spectra = ()
        self._pending = None
        self.grid = None
        self.module_list.clear()
        if self.heatmap_widget is not None:
            self.image.clear()
            for curve in self.curves.values():
                self.curves_plot.removeItem(curve)
        self.curves.clear()
        self.advice_label.clear()
        self.source_label.setText("Waiting for the first spectrum snapshot")

    # ---- drawing --------------------------------------------------------------------------------------------

    def _fill_module_list(self) -> None:
        keep = set(self.checked_modules()) & {s.name for s in self.spectra}
        chosen = keep or set(_default_curves(self.spectra))
        self.module_list.blockSignals(True)
        self.module_list.clear()
        for s in self.spectra:
            item = QListWidgetItem(short_name(s.name))  # "7 q_proj"; the full name is the tooltip
            item.setData(Qt.UserRole, s.name)
            item.setToolTip(s.name)
            item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
            item.setCheckState(Qt.Checked if s.name in chosen else Qt.Unchecked)
            self.module_list.addItem(item)
        self.module_list.blockSignals(False)

    def _draw_heatmap(self) -> None:
        if not self.spectra or self.heatmap_widget is None:
            return
        metric = self.metric
        self.grid = grid = SpectrumGrid.of(self.spectra, metric)
        self.image.setImage(grid.values, autoLevels=False)
        high = float(max(s.rank for s in self.spectra)) if metric == "rank" else 1.0
        self.colour_bar.setLevels((0.0, high))
        self.colour_bar.getAxis("left").setLabel("effective rank (90%)" if metric == "rank" else "top-1 energy share")
        self.image.setRect(0, 0, len(grid.kinds), len(grid.layers))
        every = max(1, len(grid.layers) // MAX_LAYER_TICKS)
        left = [(i + 0.5, "other" if n == NO_LAYER else str(n)) for i, n in enumerate(grid.layers) if i % every == 0]
        self.heatmap_plot.getAxis("left").setTicks([left])
        shared = shared_suffix(grid.kinds)  # "_proj": left off the ticks, so that narrow columns keep a label
        kinds = [kind[: len(kind) - len(shared)] for kind in grid.kinds]
        self.heatmap_plot.getAxis("bottom").setTicks([[(j + 0.5, k) for j, k in enumerate(kinds)]])
        self.heatmap_plot.setLabel("bottom", f"module kind (…{shared})" if shared else "module kind")
        self.heatmap_plot.setRange(xRange=(0, len(grid.kinds)), yRange=(0, len(grid.layers)), padding=0)

    def _draw_curves(self) -> None:
        if self.curves_widget is None:
            return
        by_name = {s.name: s for s in self.spectra}
        wanted = [n for n in self.checked_modules() if n in by_name]
        for name in list(self.curves):
            if name not in wanted:
                self.curves_plot.removeItem(self.curves.pop(name))
        for i, name in enumerate(wanted):
            values = np.asarray(by_name[name].values, dtype=float)
            index = np.arange(1, len(values) + 1, dtype=float)
            positive = values > 0  # an untrained update is all zeros: nothing to draw on a log axis
            if name not in self.curves:
                pen = pg.mkPen(PALETTE[i % len(PALETTE)], width=2)
                self.curves[name] = self.curves_plot.plot(pen=pen, symbol="o", symbolSize=5, name=short_name(name))
            self.curves[name].setData(index[positive], values[positive])
        if wanted:  # whole-number ticks on the index axis
            rank = max(len(by_name[name].values) for name in wanted)
            spacing = max(1, math.ceil(rank / MAX_INDEX_TICKS))
            self.curves_plot.getAxis("bottom").setTickSpacing(major=spacing, minor=spacing)

    @Slot(int)
    def _on_metric_index_changed(self, _index: int) -> None:
        self._draw_heatmap()

    @Slot(object)
    def _on_module_item_changed(self, _item: QListWidgetItem) -> None:
        self._draw_curves()
