"""The runs panel: every run folder under the runs folder (plus any opened from elsewhere with File ▸ Open
run…), with what it trained and how it ended; tick runs to overlay their loss curves (training as a line,
validation dashed with squares, one colour per run), and act on the selected one: resume it, look at its
adapter's spectra, export its adapter or merge it into its base.

Reading a run folder (core/train/run_folder.py) is plain file work, done when the panel is shown or refreshed: a run
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
from studio.core.train.run_folder import RunSummary, event_from, read_records, read_run
from studio.ui.plots import DOTS_UP_TO, PALETTE, step_plot

# how a run ended comes first: the panel is often narrower than the whole row
COLUMNS = ("Run", "Status", "Final loss", "Score", "Steps", "Model", "Targets · rank", "Data")
ROW_HINT = "Tick to overlay its loss curves; double-click to tick it and draw its curves in bold"
NO_ADAPTER = "This run saved no adapter and no checkpoint yet: nothing to export or merge"
WIDTH, SELECTED_WIDTH = 1.5, 3.0  # the selected run's curves stand out


class RunsPanel(QWidget):
    sig_resume_requested = Signal(str)  # a run folder to continue training
    sig_spectra_requested = Signal(object, str)  # (tuple of ModuleSpectrum, where they come from)
    sig_export_requested = Signal(object)  # RunSummary whose adapter to export
    sig_merge_requested = Signal(object)  # RunSummary whose adapter to merge into its base

    def __init__(self, runs_folder: Callable[[], Path], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._runs_folder = runs_folder
        self._opened: list[Path] = []  # run folders opened from outside the runs folder
        self._actions_busy = False  # an export or merge is running (one at a time)
        self.runs: list[RunSummary] = []
        self.plot_widget: pg.PlotWidget | None = None  # built on first show (see plots.py on why)
        self.curves: dict[str, pg.PlotDataItem] = {}
        self.val_curves: dict[str, pg.PlotDataItem] = {}
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
        self.export_button = QPushButton("Export adapter…")
        self.export_button.clicked.connect(self._on_export_clicked)
        self.merge_button = QPushButton("Merge and save…")
        self.merge_button.clicked.connect(self._on_merge_clicked)
        self.table = QTreeWidget()
        self.table.setHeaderLabels(list(COLUMNS))
        self.table.setRootIsDecorated(False)
        self.table.setAlternatingRowColors(True)
        self.table.header().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.table.itemChanged.connect(self._on_item_changed)
        self.table.itemSelectionChanged.connect(self._on_selection_changed)
        self.table.itemDoubleClicked.connect(self._on_item_double_clicked)
        self.message_label = QLabel()
        self.message_label.setWordWrap(True)
        top = QHBoxLayout()
        top.addWidget(self.folder_label, 1)
        top.addWidget(refresh)
        actions = QHBoxLayout()
        for button in (self.resume_button, self.spectra_button, self.export_button, self.merge_button):
            actions.addWidget(button)
        actions.addStretch(1)
        self.split = QSplitter(Qt.Vertical)
        self.split.addWidget(self.table)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(top)
        layout.addLayout(actions)
        layout.addWidget(self.split, 1)
        layout.addWidget(self.message_label)
        self._update_buttons()

    def showEvent(self, event: QShowEvent) -> None:  # noqa: N802 - Qt's name
        super().showEvent(event)
        if self.plot_widget is None:
            self.plot_widget = step_plot("Loss of the ticked runs: training (line), validation (dashed, ■)", "loss")
            self.plot_widget.getPlotItem().addLegend(offset=(-10, 10))
            self.split.addWidget(self.plot_widget)
            self.split.setSizes([200, 500])  # the list scrolls; the curves need the room
        self.refresh()

    # ---- the list -------------------------------------------------------------------------------------------

    @Slot()
    def refresh(self) -> None:
        """Read the run folders again (ticks and the selection on runs that are still there stay)."""
        folder = self._runs_folder()
        ticked = set(self.ticked_runs())
        selected = self.selected_run()
        self.folder_label.setText(f"Runs in <b>{folder}</b>")
        candidates = [p for p in folder.iterdir() if (p / "run.yaml").is_file()] if folder.is_dir() else []
        inside = {p.resolve() for p in candidates}
        candidates += [p for p in self._opened if p.resolve() not in inside and (p / "run.yaml").is_file()]
        runs, unreadable = [], 0
        for path in sorted(candidates, key=lambda p: p.name, reverse=True):  # names start with their time
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
            item = QTreeWidgetItem([run.folder.name, run.status, loss, score, f"{run.steps_done} / {run.total_steps}",
                                    run.model, run.targets, run.data])
            item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
            item.setCheckState(0, Qt.Checked if str(run.folder) in ticked else Qt.Unchecked)
            item.setData(0, Qt.UserRole, str(run.folder))
            item.setToolTip(0, f"{run.folder}\n{ROW_HINT}")
            item.setToolTip(1, run.status)
            self.table.addTopLevelItem(item)
            if selected is not None and run.folder == selected.folder:
                item.setSelected(True)
        self.table.blockSignals(False)
        skipped = f" ({unreadable} folder(s) with an unreadable run.yaml left out)" if unreadable else ""
        self.message_label.setText(f"{len(runs)} run(s){skipped}" if runs or skipped else
                                   "No runs yet: start one in the Train tab")
        self._draw_curves()
        self._update_buttons()

    def open_run(self, folder: str | Path) -> RunSummary:
        """List a run folder (from anywhere) and select it. Raises StudioError when it is not a readable run."""
        folder = Path(folder).expanduser()
        if not (folder / "run.yaml").is_file():
            raise StudioError(f"{folder} is not a run folder: it holds no run.yaml")
        run = read_run(folder)  # a broken run.yaml says what is wrong before the folder joins the list
        if all(p.resolve() != folder.resolve() for p in self._opened):
            self._opened.append(folder)
        self.refresh()
        self.select_run(folder)
        return run

    def ticked_runs(self) -> list[str]:
        return [item.data(0, Qt.UserRole) for item in self._items() if item.checkState(0) == Qt.Checked]

    def set_ticked(self, folders: list[str]) -> None:
        for item in self._items():
            item.setCheckState(0, Qt.Checked if item.data(0, Qt.UserRole) in folders else Qt.Unchecked)

    def select_run(self, folder: str | Path) -> None:
        wanted = Path(folder).resolve()
        item = next((i for i in self._items() if Path(i.data(0, Qt.UserRole)).resolve() == wanted), None)
        if item is not None:
            self.table.setCurrentItem(item)
            self.table.scrollToItem(item)

    def selected_run(self) -> RunSummary | None:
        items = self.table.selectedItems()
        if not items:
            return None
        folder = items[0].data(0, Qt.UserRole)
        return next((run for run in self.runs if str(run.folder) == folder), None)

    def set_actions_busy(self, busy: bool) -> None:
        """While an export or merge runs, another cannot start."""
        self._actions_busy = busy
        self._update_buttons()

    def _items(self) -> list[QTreeWidgetItem]:
        return [self.table.topLevelItem(i) for i in range(self.table.topLevelItemCount())]

    # ---- reactions ------------------------------------------------------------------------------------------

    @Slot(object, int)
    def _on_item_changed(self, _item: QTreeWidgetItem, column: int) -> None:
        if column == 0:
            self._draw_curves()

    @Slot()
    def _on_selection_changed(self) -> None:
        self._update_buttons()
        self._draw_curves()

    @Slot(object, int)
    def _on_item_double_clicked(self, item: QTreeWidgetItem, _column: int) -> None:
        self.table.setCurrentItem(item)
        item.setCheckState(0, Qt.Checked)  # redraws through itemChanged; the selection makes its curves bold

    def _draw_curves(self) -> None:
        if self.plot_widget is None:
            return
        plot = self.plot_widget.getPlotItem()
        for curves in (self.curves, self.val_curves):
            for folder in list(curves):
                plot.removeItem(curves.pop(folder))
        by_folder = {str(run.folder): run for run in self.runs}
        selected = self.selected_run()
        for i, folder in enumerate(f for f in self.ticked_runs() if f in by_folder):
            run, colour = by_folder[folder], PALETTE[i % len(PALETTE)]
            width = SELECTED_WIDTH if selected is not None and selected.folder == run.folder else WIDTH
            steps, losses = zip(*run.losses) if run.losses else ((), ())
            self.curves[folder] = plot.plot(
                list(steps), list(losses), pen=pg.mkPen(colour, width=width), name=run.folder.name,
                symbol="o" if len(steps) <= DOTS_UP_TO else None, symbolSize=4, symbolBrush=colour, symbolPen=None)
            if run.val_losses:
                val_steps, val_losses = zip(*run.val_losses)
                self.val_curves[folder] = plot.plot(
                    list(val_steps), list(val_losses), pen=pg.mkPen(colour, width=width, style=Qt.DashLine),
                    symbol="s", symbolSize=7, symbolBrush=colour, symbolPen=None)
            if width == SELECTED_WIDTH:
                for item in (self.curves.get(folder), self.val_curves.get(folder)):
                    if item is not None:
                        item.setZValue(1)

    def _update_buttons(self) -> None:
        run = self.selected_run()
        self.resume_button.setEnabled(run is not None and run.resumable)
        self.spectra_button.setEnabled(run is not None)
        has_adapter = run is not None and run.adapter is not None
        for button, what in ((self.export_button, "Copy the selected run's adapter (PEFT format) to a folder"),
                             (self.merge_button, "Fold the selected run's adapter into the base its run.yaml "
                                                 "names and save one plain model folder")):
            button.setEnabled(has_adapter and not self._actions_busy)
            button.setToolTip(what if run is None or has_adapter else NO_ADAPTER)

    @Slot()
    def _on_resume_clicked(self) -> None:
        run = self.selected_run()
        if run is not None:
            self.sig_resume_requested.emit(str(run.folder))

    @Slot()
    def _on_export_clicked(self) -> None:
        run = self.selected_run()
        if run is not None:
            self.sig_export_requested.emit(run)

    @Slot()
    def _on_merge_clicked(self) -> None:
        run = self.selected_run()
        if run is not None:
            self.sig_merge_requested.emit(run)

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
