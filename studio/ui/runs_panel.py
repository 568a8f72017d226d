"""The runs panel: every run folder under the runs folder (plus any opened from elsewhere with File ▸ Open
run…), with what it trained and how it ended; tick runs to overlay their loss curves (training as a line,
validation dashed with squares, one colour per run), and act on the selected one: resume it, look at its
adapter's spectra, export its adapter or merge it into its base.

The panel reads only what it shows, and never on the UI thread (run_jobs.py): the list's summaries when it is
shown or refreshed, the curves of the runs that are ticked, the last spectrum snapshot when asked for. The table
fills when the listing arrives; ticks and the selection on runs that are still there stay.
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
from studio.core.run_layout import is_run_folder
from studio.core.train.run_folder import RunCurves, RunSummary
from studio.ui.loss_overlay import LossOverlay, Overlaid
from studio.ui.plots import PALETTE
from studio.ui.run_jobs import LastSpectrum, RunJobs, RunListing

# how a run ended comes first: the panel is often narrower than the whole row
COLUMNS = ("Run", "Status", "Final loss", "Score", "Steps", "Model", "Targets · rank", "Data")
ROW_HINT = "Tick to overlay its loss curves; double-click to tick it and draw its curves in bold"
NO_ADAPTER = "This run saved no adapter and no checkpoint yet: nothing to export or merge"


class RunsPanel(QWidget):
    sig_resume_requested = Signal(str)  # a run folder to continue training
    sig_spectra_requested = Signal(object, str)  # (tuple of ModuleSpectrum, where they come from)
    sig_export_requested = Signal(object)  # RunSummary whose adapter to export
    sig_merge_requested = Signal(object)  # RunSummary whose adapter to merge into its base
    sig_listed = Signal()  # the table shows a new listing
    sig_run_opened = Signal(str)  # a folder given to open_run is listed and selected
    sig_run_open_failed = Signal(str)  # the one line saying why a folder given to open_run cannot be listed

    def __init__(self, runs_folder: Callable[[], Path], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._runs_folder = runs_folder
        self._opened: list[Path] = []  # run folders opened from outside the runs folder
        self._opening: list[Path] = []  # given to open_run, waiting for a listing that looked at them
        self._actions_busy = False  # an export or merge is running (one at a time)
        self.runs: list[RunSummary] = []
        self._curves_read: dict[str, RunCurves] = {}  # by run folder, for runs ticked since the last listing
        self.overlay = LossOverlay(self)
        self.jobs = RunJobs(self)
        self.jobs.sig_listed.connect(self._on_jobs_listed)
        self.jobs.sig_curves_read.connect(self._on_jobs_curves_read)
        self.jobs.sig_spectrum_read.connect(self._on_jobs_spectrum_read)
        self.jobs.sig_failed.connect(self._on_jobs_failed)
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
        if self.overlay.widget is None:
            self.split.addWidget(self.overlay.build())
            self.split.setSizes([200, 500])  # the list scrolls; the curves need the room
        self.refresh()

    # ---- the list -------------------------------------------------------------------------------------------

    @Slot()
    def refresh(self) -> None:
        """Read the run folders again, off the UI thread; the table fills when they have been read."""
        folder = self._runs_folder()
        self.folder_label.setText(f"Runs in <b>{folder}</b>")
        if not self.runs:
            self.message_label.setText("Reading the run folders…")
        self.jobs.list_runs(folder, self._opened)

    def is_listing(self) -> bool:
        return self.jobs.is_listing()

    @Slot(object)
    def _on_jobs_listed(self, listing: RunListing) -> None:
        looked_at = {p.resolve() for p in listing.opened}
        opened = [p for p in self._opening if p.resolve() in looked_at]
        self._opening = [p for p in self._opening if p.resolve() not in looked_at]
        failed = {p.resolve(): why for p, why in listing.unreadable}
        self._opened = [p for p in self._opened if p.resolve() not in failed]
        self._fill_table(list(listing.runs))
        unreadable = len(listing.unreadable)
        skipped = f" ({unreadable} folder(s) with an unreadable run.yaml left out)" if unreadable else ""
        self.message_label.setText(f"{len(self.runs)} run(s){skipped}" if self.runs or skipped else
                                   "No runs yet: start one in the Train tab")
        self.jobs.read_curves(self.ticked_runs())  # the runs may have grown since their curves were read
        self._draw_curves()
        self._update_buttons()
        self.sig_listed.emit()
        listed = {run.folder.resolve() for run in self.runs}
        for folder in opened:
            if folder.resolve() in listed:
                self.select_run(folder)
                self.sig_run_opened.emit(str(folder))
            else:
                self.sig_run_open_failed.emit(
                    failed.get(folder.resolve(), f"{folder} is not a run folder: it holds no run.yaml"))

    def _fill_table(self, runs: list[RunSummary]) -> None:
        """One row per run; ticks and the selection on runs that are still there stay."""
        ticked = set(self.ticked_runs())
        selected = self.selected_run()
        self.runs = runs
        listed = {str(run.folder) for run in runs}
        self._curves_read = {f: c for f, c in self._curves_read.items() if f in listed}
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

    def open_run(self, folder: str | Path) -> None:
        """List a run folder (from anywhere) and select it once it is read: `sig_run_opened` then, or
        `sig_run_open_failed` with the line saying why it cannot be read. Raises StudioError at once when the
        folder holds no run.yaml."""
        folder = Path(folder).expanduser()
        if not is_run_folder(folder):
            raise StudioError(f"{folder} is not a run folder: it holds no run.yaml")
        if all(p.resolve() != folder.resolve() for p in self._opened):
            self._opened.append(folder)
        self._opening.append(folder)
        self.refresh()

    def ticked_runs(self) -> list[str]:
        return [item.data(0, Qt.UserRole) for item in self._items() if item.checkState(0) == Qt.Checked]

    def set_ticked(self, folders: list[str]) -> None:
        self.table.blockSignals(True)  # one redraw, not one per row
        for item in self._items():
            item.setCheckState(0, Qt.Checked if item.data(0, Qt.UserRole) in folders else Qt.Unchecked)
        self.table.blockSignals(False)
        self._draw_curves()

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

    @Slot(object)
    def _on_jobs_curves_read(self, curves: dict[str, RunCurves]) -> None:
        listed = {str(run.folder) for run in self.runs}
        self._curves_read.update((f, c) for f, c in curves.items() if f in listed)
        self._draw_curves()

    @property
    def curves(self) -> dict[str, pg.PlotDataItem]:
        """The training loss curves drawn, by run folder."""
        return self.overlay.curves

    @property
    def val_curves(self) -> dict[str, pg.PlotDataItem]:
        return self.overlay.val_curves

    def _draw_curves(self) -> None:
        """Overlay the ticked runs whose curves have been read; ask for the others (they draw when they arrive)."""
        by_folder = {str(run.folder): run for run in self.runs}
        ticked = [f for f in self.ticked_runs() if f in by_folder]
        self.jobs.read_curves(f for f in ticked if f not in self._curves_read)
        selected = self.selected_run()
        self.overlay.show([
            Overlaid(folder, by_folder[folder].folder.name, self._curves_read[folder], PALETTE[i % len(PALETTE)],
                     selected is not None and str(selected.folder) == folder)
            for i, folder in enumerate(ticked) if folder in self._curves_read
        ])

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
        if run is not None:
            self.jobs.read_spectrum(run.folder)

    @Slot(object)
    def _on_jobs_spectrum_read(self, last: LastSpectrum) -> None:
        snapshot = last.snapshot
        if snapshot is None:
            self.message_label.setText(f"{last.folder.name} recorded no spectra (spectrum snapshots were off); "
                                       "Adapter ▸ Load adapter… reads them from its adapter folder")
            return
        self.sig_spectra_requested.emit(snapshot.modules, f"{last.folder.name}, step {snapshot.step}")

    @Slot(str)
    def _on_jobs_failed(self, message: str) -> None:
        self.message_label.setText(message)
