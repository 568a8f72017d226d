"""The runs panel: every run folder under the runs folder, with what it trained and how it ended; tick runs to
overlay their loss curves, and reopen one to resume it or to look at its adapter's spectra.

Reading a run folder (run_folder.py) is plain file work, done when the panel is shown or refreshed: a run
holds a line per step, so even long runs read in milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtGui import QShowEvent
from PySide6.QtWidgets import (
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSplitter,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from studio.core.errors import StudioError
from studio.ui.plots import PALETTE, step_plot
from studio.ui.run_folder import RunSummary, event_from, read_records, read_run

COLUMNS = ("Run", "Model", "Targets · rank", "Data", "Steps", "Status", "Final loss", "Score")


class RunsPanel(QWidget):
    sig_resume_requested = Signal(str)  # a run folder to continue training
    sig_spectra_requested = Signal(object, str)  # (tuple of ModuleSpectrum, where they come from)

    def __init__(self, runs_folder: Callable[[], Path], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._runs_folder = runs_folder
        self.runs: list[RunSummary] = []
        self.plot_widget: pg.PlotWidget | None = None  # built on first show (see plots.py on why)
        self.curves: dict[str, pg.PlotDataItem] = {}
        self.folder_label = QLabel()
        self.folder_label.setWordWrap(True)
        refresh = QPushButton("Refresh")
        refresh.clicked.connect(self.refresh)
        self.resume_button = QPushButton("Resume")
        self.resume_button.setToolTip("Continue the selected run from its latest checkpoint (Train tab)")
        self.resume_button.clicked.connect(self._on_resume_clicked)
        self.spectra_button = QPushButton("Show spectra")
        self.spectra_button.setToolTip("The selected run's last singular-value snapshot (Spectrum tab)")
        self.spectra_button.clicked.connect(self._on_spectra_clicked)
        self.table = QTreeWidget()
        self.table.setHeaderLabels(list(COLUMNS))
        self.table.setRootIsDecorated(False)
        self.table.setAlternatingRowColors(True)
        self.table.header().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.table.itemChanged.connect(self._on_item_changed)
        self.table.itemSelectionChanged.connect(self._update_buttons)
        self.message_label = QLabel()
        self.message_label.setWordWrap(True)
        top = QHBoxLayout()
        top.addWidget(self.folder_label, 1)
        for button in (refresh, self.resume_button, self.spectra_button):
            top.addWidget(button)
        self.split = QSplitter(Qt.Vertical)
        self.split.addWidget(self.table)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(top)
        layout.addWidget(self.split, 1)
        layout.addWidget(self.message_label)
        self._update_buttons()

    def showEvent(self, event: QShowEvent) -> None:  # noqa: N802 - Qt's name
        super().showEvent(event)
        if self.plot_widget is None:
            self.plot_widget = step_plot("Training loss of the ticked runs", "loss")
            self.plot_widget.getPlotItem().addLegend(offset=(-10, 10))
            self.split.addWidget(self.plot_widget)
            self.split.setSizes([300, 400])
        self.refresh()

    # ---- the list -------------------------------------------------------------------------------------------

    @Slot()
    def refresh(self) -> None:
        """Read the run folders again (ticks on runs that are still there stay ticked)."""
        folder = self._runs_folder()
        ticked = set(self.ticked_runs())
        self.folder_label.setText(f"Runs in <b>{folder}</b>")
        runs, unreadable = [], 0
        candidates = sorted((p for p in folder.iterdir() if (p / "run.yaml").is_file()), reverse=True) if (
            folder.is_dir()) else []
        for path in candidates:
            try:
                runs.append(read_run(path))
            except StudioError:
                unreadable += 1
        self.runs = runs
        self.table.blockSignals(True)
        self.table.clear()
        for run in runs:
            loss = f"{run.final_loss:.4f}" if run.final_loss is not None else "—"
            score = f"{run.score:.3f}" if run.score is not None else "—"
            item = QTreeWidgetItem([run.folder.name, run.model, run.targets, run.data,
                                    f"{run.steps_done} / {run.total_steps}", run.status, loss, score])
            item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
            item.setCheckState(0, Qt.Checked if str(run.folder) in ticked else Qt.Unchecked)
            item.setData(0, Qt.UserRole, str(run.folder))
            item.setToolTip(5, run.status)
            self.table.addTopLevelItem(item)
        self.table.blockSignals(False)
        skipped = f" ({unreadable} folder(s) with an unreadable run.yaml left out)" if unreadable else ""
        self.message_label.setText(f"{len(runs)} run(s){skipped}" if runs or skipped else
                                   "No runs yet: start one in the Train tab")
        self._draw_curves()
        self._update_buttons()

    def ticked_runs(self) -> list[str]:
        items = (self.table.topLevelItem(i) for i in range(self.table.topLevelItemCount()))
        return [item.data(0, Qt.UserRole) for item in items if item.checkState(0) == Qt.Checked]

    def set_ticked(self, folders: list[str]) -> None:
        for i in range(self.table.topLevelItemCount()):
            item = self.table.topLevelItem(i)
            item.setCheckState(0, Qt.Checked if item.data(0, Qt.UserRole) in folders else Qt.Unchecked)

    def selected_run(self) -> RunSummary | None:
        items = self.table.selectedItems()
        if not items:
            return None
        folder = items[0].data(0, Qt.UserRole)
        return next((run for run in self.runs if str(run.folder) == folder), None)

    # ---- reactions ------------------------------------------------------------------------------------------

    @Slot(object, int)
    def _on_item_changed(self, _item: QTreeWidgetItem, column: int) -> None:
        if column == 0:
            self._draw_curves()

    def _draw_curves(self) -> None:
        if self.plot_widget is None:
            return
        plot = self.plot_widget.getPlotItem()
        ticked = self.ticked_runs()
        for folder in list(self.curves):
            plot.removeItem(self.curves.pop(folder))
        by_folder = {str(run.folder): run for run in self.runs}
        for i, folder in enumerate(f for f in ticked if f in by_folder):
            run = by_folder[folder]
            steps = [s for s, _ in run.losses]
            losses = [loss for _, loss in run.losses]
            pen = pg.mkPen(PALETTE[i % len(PALETTE)], width=2)
            self.curves[folder] = plot.plot(steps, losses, pen=pen, name=run.folder.name,
                                            symbol="o" if len(steps) < 40 else None, symbolSize=4)

    def _update_buttons(self) -> None:
        run = self.selected_run()
        self.resume_button.setEnabled(run is not None and run.resumable)
        self.spectra_button.setEnabled(run is not None)

    @Slot()
    def _on_resume_clicked(self) -> None:
        run = self.selected_run()
        if run is not None:
            self.sig_resume_requested.emit(str(run.folder))

    @Slot()
    def _on_spectra_clicked(self) -> None:
        run = self.selected_run()
        if run is None:
            return
        snapshots = [r for r in read_records(run.folder, "spectra.jsonl") if r.get("event") == "SpectrumSnapshot"]
        if not snapshots:
            self.message_label.setText(f"{run.folder.name} recorded no spectra (spectrum snapshots were off); "
                                       "Adapter ▸ Load adapter… reads them from its adapter folder")
            return
        snapshot = event_from(snapshots[-1])
        self.sig_spectra_requested.emit(snapshot.modules, f"{run.folder.name}, step {snapshot.step}")
