"""The data panel: which file to train on and how to read it, shown the way the model will see it.

Open a file (CSV/TSV, JSON, JSONL, Parquet, TXT) or a hub dataset id, pick the format and map columns to roles
(detected by default), choose what becomes of rows longer than the maximum length, hold out validation data (a
file or a fraction), and see one formatted row with its loss tokens highlighted, the token-length histogram
against the maximum length, how many training examples and optimizer steps an epoch is, and every row that had
to be left out. It starts on the built-in demo, so a fresh window can train in one click.

All reading and tokenizing runs in `DataJobs` off the UI thread; see data_jobs.py.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PySide6.QtCore import QSettings, Qt, QTimer, Signal, Slot
from PySide6.QtGui import QResizeEvent, QShowEvent
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListView,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from studio.core.data.dataset import DataSpec, Preview, demo_spec
from studio.core.data.formats import FORMATS
from studio.core.errors import DataError
from studio.ui.bad_rows import BadRowsModel, source_label
from studio.ui.column_mapping import ColumnMapping
from studio.ui.data_jobs import DataAnalysis, DataJobs
from studio.ui.data_source_dialog import SOURCE_HINT, ask_for_data_source
from studio.ui.data_summary import OVERFLOW_FATES, field_help, summary_html
from studio.ui.length_histogram import LengthHistogram
from studio.ui.overflow_choice import OverflowChoice

LOSS_COLOURS = ("#ffd43b", "#ffe58f")  # alternating, so neighbouring tokens stay apart
CONTEXT_COLOURS = ("#e9ecef", "#f8f9fa")
ERROR_STYLE = "color: #b3261e; font-weight: bold;"
SPLITS = (("No validation", "none"), ("Hold out a fraction", "fraction"), ("Validation file", "file"))
SIDE_BY_SIDE_WIDTH = 760  # below this the preview goes under the settings
STACKED_PREVIEW_HEIGHT = 560  # the preview and histogram keep this much height once stacked (the tab scrolls)
REFRESH_DELAY_MS = 200  # typing in a spin box re-reads the data once it settles


def preview_html(preview: Preview) -> str:
    """The row as the model sees it: one span per token, loss tokens on a yellow background."""
    if preview.problem:
        return f'<p style="color:#b3261e"><b>Row {preview.row} is left out:</b> {html.escape(preview.problem)}</p>'
    spans = []
    for i, (piece, loss) in enumerate(preview.tokens):
        colour = (LOSS_COLOURS if loss else CONTEXT_COLOURS)[i % 2]
        spans.append(f'<span style="background-color:{colour}">{html.escape(piece)}</span>')
    return f'<div style="white-space: pre-wrap; font-family: monospace">{"".join(spans)}</div>'


class DataPanel(QWidget):
    sig_analysed = Signal(object)  # DataAnalysis, whenever a (re)analysis or preview arrives

    def __init__(self, settings: QSettings, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._settings = settings
        self.analysis: DataAnalysis | None = None
        self.shown_preview: Preview | None = None
        self._max_length = demo_spec().max_length
        self._batch = (8, 1)  # the training form's batch size and gradient accumulation (set_batch)
        self._columns: tuple[str, ...] = ()
        self._stale = True  # settings changed while the panel was hidden
        self.jobs = DataJobs(self)
        self.jobs.sig_analysed.connect(self._on_jobs_analysed)
        self._refresh_timer = QTimer(self)
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(REFRESH_DELAY_MS)
        self._refresh_timer.timeout.connect(self.refresh)
        self._build()
        self._load_spec(demo_spec())

    # ---- layout ---------------------------------------------------------------------------------------------

    def _build(self) -> None:
        self.path_edit = QLineEdit()
        self.path_edit.setReadOnly(True)
        self.path_edit.setToolTip(field_help("train_path"))
        open_button = QPushButton("Open…")
        open_button.setToolTip(SOURCE_HINT)
        open_button.clicked.connect(self.choose_file)
        demo_button = QPushButton("Built-in demo")
        demo_button.setToolTip("Dates to ISO 8601: 300 training and 60 held-out rows for the built-in model")
        demo_button.clicked.connect(lambda: self._load_spec(demo_spec()))
        file_row = QHBoxLayout()
        file_row.addWidget(self.path_edit, 1)
        file_row.addWidget(open_button)
        file_row.addWidget(demo_button)

        self.format_combo = QComboBox()
        self.format_combo.addItem("auto (detect)", "auto")
        for fmt in FORMATS:
            self.format_combo.addItem(fmt, fmt)
        self.format_combo.currentIndexChanged.connect(self._on_format_changed)
        self.format_combo.setToolTip(field_help("format"))
        self.detected_label = QLabel()
        self.txt_combo = QComboBox()
        self.txt_combo.addItem("one document per file", "file")
        self.txt_combo.addItem("blank-line-separated blocks", "blocks")
        self.txt_combo.currentIndexChanged.connect(self._schedule_refresh)
        self.txt_combo.setToolTip(field_help("txt_mode"))
        self.packing_check = QCheckBox("pack examples")
        self.packing_check.setToolTip(field_help("packing"))
        self.packing_check.toggled.connect(self._schedule_refresh)
        self.overflow = OverflowChoice(self._max_length)
        self.overflow.sig_changed.connect(self._schedule_refresh)
        self.columns = ColumnMapping()
        self.columns.sig_changed.connect(self._schedule_refresh)

        self.split_combo = QComboBox()
        for text, key in SPLITS:
            self.split_combo.addItem(text, key)
        self.split_combo.currentIndexChanged.connect(self._on_split_changed)
        self.split_combo.setToolTip(f"{field_help('val_fraction')}; or {field_help('val_path')[0].lower()}"
                                    f"{field_help('val_path')[1:]}")
        self.fraction_spin = QDoubleSpinBox()
        self.fraction_spin.setRange(0.01, 0.5)
        self.fraction_spin.setSingleStep(0.05)
        self.fraction_spin.setValue(0.1)
        self.fraction_spin.valueChanged.connect(self._schedule_refresh)
        self.val_edit = QLineEdit()
        self.val_edit.setReadOnly(True)
        val_button = QPushButton("…")
        val_button.setMaximumWidth(32)
        val_button.clicked.connect(self._on_val_browse_clicked)
        self.val_row = QWidget()
        val_layout = QHBoxLayout(self.val_row)
        val_layout.setContentsMargins(0, 0, 0, 0)
        val_layout.addWidget(self.val_edit, 1)
        val_layout.addWidget(val_button)

        form = QFormLayout()
        form.addRow("Format", self._pair(self.format_combo, self.detected_label))
        form.addRow("Text files", self.txt_combo)
        form.addRow("Longer rows", self.overflow)
        form.addRow("", self.packing_check)
        form.addRow("Validation", self.split_combo)
        form.addRow("Fraction", self.fraction_spin)
        form.addRow("File", self.val_row)
        self.settings_form = form
        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(0, 0, 0, 0)
        left_layout.addLayout(form)
        left_layout.addWidget(self.columns)
        self.summary_label = QLabel()
        self.summary_label.setWordWrap(True)
        self.error_label = QLabel()
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet(ERROR_STYLE)
        self.error_label.hide()
        left_layout.addWidget(self.summary_label)
        left_layout.addWidget(self.error_label)
        self.bad_rows_label = QLabel("Bad rows")
        self.bad_rows = BadRowsModel(self)
        self.bad_rows_list = QListView()
        self.bad_rows_list.setUniformItemSizes(True)  # the view lays out only the rows it shows
        self.bad_rows_list.setModel(self.bad_rows)
        left_layout.addWidget(self.bad_rows_label)
        left_layout.addWidget(self.bad_rows_list, 1)

        self.row_spin = QSpinBox()
        self.row_spin.setRange(1, 1)
        self.row_spin.setPrefix("row ")
        self.row_spin.valueChanged.connect(self._on_row_changed)
        self.row_label = QLabel()
        self.row_label.setWordWrap(True)  # a long file name must not widen the panel
        self.preview_view = QTextBrowser()
        self.preview_view.setPlaceholderText("The formatted example appears here")
        preview_box = QGroupBox("Preview (loss tokens highlighted)")
        preview_layout = QVBoxLayout(preview_box)
        row = QHBoxLayout()
        row.addWidget(self.row_spin)
        row.addWidget(self.row_label, 1)
        preview_layout.addLayout(row)
        preview_layout.addWidget(self.preview_view, 1)

        self.histogram = LengthHistogram()
        self.preview_split = QSplitter(Qt.Vertical)
        self.preview_split.addWidget(preview_box)
        self.preview_split.addWidget(self.histogram)
        self.preview_split.setSizes([420, 300])
        self.split = QSplitter(Qt.Horizontal)
        self.split.addWidget(left)
        self.split.addWidget(self.preview_split)
        self.split.setSizes([460, 900])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(file_row)
        layout.addWidget(self.split, 1)

    @staticmethod
    def _row(*widgets: QWidget) -> QHBoxLayout:
        row = QHBoxLayout()
        for widget in widgets:
            row.addWidget(widget)
        row.addStretch(1)
        return row

    def _pair(self, *widgets: QWidget) -> QWidget:
        box = QWidget()
        box.setLayout(self._row(*widgets))
        box.layout().setContentsMargins(0, 0, 0, 0)
        return box

    # ---- public ---------------------------------------------------------------------------------------------

    def set_tokenizer(self, tokenizer: Any | None) -> None:
        """The open model's tokenizer (None in plan mode): formatting and lengths depend on it."""
        self.jobs.set_tokenizer(tokenizer)
        self._schedule_refresh()  # a moment later: the window is still busy showing the new model

    def set_max_length(self, max_length: int) -> None:
        if max_length != self._max_length:
            self._max_length = max_length
            self.overflow.set_max_length(max_length)
            self._schedule_refresh()

    def set_batch(self, batch_size: int, gradient_accumulation: int = 1) -> None:
        """The training form's batch: the summary says how many optimizer steps an epoch is."""
        self._batch = (batch_size, gradient_accumulation)
        if self.analysis is not None and self.analysis.prepared is not None:
            self.summary_label.setText(summary_html(self.analysis.prepared, *self._batch))

    def open_file(self, path: str | Path) -> None:
        """Train on `path` from now on; format and columns go back to detection."""
        self._load_spec(DataSpec(train_path=str(path)))

    def spec(self) -> DataSpec:
        """The data as set up in the panel. Raises DataError when the settings contradict each other."""
        split = self.split_combo.currentData()
        if split == "file" and not self.val_edit.text():
            raise DataError("choose the validation file, or another validation setting")
        columns = self.columns.mapping()
        return DataSpec(
            train_path=self.path_edit.text(), format=self.format_combo.currentData(), columns=columns,
            val_path=self.val_edit.text() if split == "file" else None,
            val_fraction=float(self.fraction_spin.value()) if split == "fraction" else 0.0,
            max_length=self._max_length, packing=self.packing_check.isChecked(),
            txt_mode=self.txt_combo.currentData(), overflow=self.overflow.overflow(), stride=self.overflow.stride(),
        )

    @Slot()
    def refresh(self) -> None:
        """Read, format and measure the data again (off the UI thread); the results arrive in sig_analysed.
        A hidden panel only notes that it is out of date and refreshes when it is shown."""
        self._refresh_timer.stop()
        if not self.isVisible():
            self._stale = True
            return
        self._stale = False
        try:
            spec = self.spec()
        except DataError as exc:
            self._show_error(str(exc))
            return
        self.jobs.analyse(spec, self.row_spin.value() - 1)

    def resizeEvent(self, event: QResizeEvent) -> None:  # noqa: N802 - Qt's name
        """Side by side when there is room; else the preview and histogram go below the settings, so that a narrow
        window scrolls down instead of cutting the preview off at the right."""
        super().resizeEvent(event)
        orientation = Qt.Horizontal if event.size().width() >= SIDE_BY_SIDE_WIDTH else Qt.Vertical
        if self.split.orientation() != orientation:
            stacked = orientation == Qt.Vertical
            self.split.setOrientation(orientation)
            self.preview_split.setMinimumHeight(STACKED_PREVIEW_HEIGHT if stacked else 0)
            self.split.setSizes([1, 1] if stacked else [460, 900])

    def showEvent(self, event: QShowEvent) -> None:  # noqa: N802 - Qt's name
        super().showEvent(event)
        if self._stale:
            self.refresh()

    def show_row(self, number: int) -> None:
        """Preview row `number` (1-based, counting bad rows too)."""
        self.row_spin.setValue(number)

    # ---- reactions ------------------------------------------------------------------------------------------

    def _load_spec(self, spec: DataSpec) -> None:
        widgets = (self.format_combo, self.split_combo, self.fraction_spin, self.packing_check, self.txt_combo)
        for widget in widgets:
            widget.blockSignals(True)
        self.path_edit.setText(spec.train_path)
        self.format_combo.setCurrentIndex(max(0, self.format_combo.findData(spec.format)))
        split = "file" if spec.val_path else "fraction" if spec.val_fraction else "none"
        self.split_combo.setCurrentIndex(self.split_combo.findData(split))
        self.val_edit.setText(spec.val_path or "")
        if spec.val_fraction:
            self.fraction_spin.setValue(spec.val_fraction)
        self.packing_check.setChecked(spec.packing)
        self.txt_combo.setCurrentIndex(self.txt_combo.findData(spec.txt_mode))
        self.overflow.show_format(None if spec.format == "auto" else spec.format, spec.overflow, spec.stride)
        for widget in widgets:
            widget.blockSignals(False)
        self._show_split_rows()
        self._set_roles(None if spec.format == "auto" else spec.format, spec.columns)
        is_txt = Path(spec.train_path).suffix.lower() == ".txt" or Path(spec.train_path).is_dir()
        self.settings_form.setRowVisible(self.txt_combo, is_txt)
        self.row_spin.blockSignals(True)
        self.row_spin.setValue(1)
        self.row_spin.blockSignals(False)
        self.analysis = None
        self.refresh()

    def _set_roles(self, fmt: str | None, mapping: Mapping[str, str],
                   resolved: Mapping[str, str] | None = None) -> None:
        self.columns.show_roles(fmt, self._columns, mapping, resolved)

    @Slot()
    def _on_format_changed(self) -> None:
        chosen = self.format_combo.currentData()
        self._set_roles(None if chosen == "auto" else chosen, {})
        self.overflow.show_format(None if chosen == "auto" else chosen)
        self._schedule_refresh()

    @Slot()
    def _on_split_changed(self) -> None:
        self._show_split_rows()
        self._schedule_refresh()

    def _show_split_rows(self) -> None:
        split = self.split_combo.currentData()
        self.settings_form.setRowVisible(self.fraction_spin, split == "fraction")
        self.settings_form.setRowVisible(self.val_row, split == "file")

    @Slot()
    def _schedule_refresh(self) -> None:
        self._refresh_timer.start()

    @Slot(int)
    def _on_row_changed(self, number: int) -> None:
        try:
            spec = self.spec()
        except DataError as exc:
            self._show_error(str(exc))
            return
        self.jobs.preview(spec, number - 1)

    def _last_folder(self) -> str:
        return str(self._settings.value("paths/data_folder", str(Path.home())))

    def _ask_for_data(self, title: str) -> str | None:
        """A data file or a hub dataset id from the Open dialog; the folder of a file is remembered."""
        try:
            chosen = ask_for_data_source(self, title, self._last_folder())
        except DataError as exc:
            self._show_error(str(exc))
            return None
        if chosen and Path(chosen).exists():
            self._settings.setValue("paths/data_folder", str(Path(chosen).parent))
        return chosen

    @Slot()
    def choose_file(self) -> None:
        """Ask for training data, a file or a hub dataset id (the Open… button and File ▸ Open dataset…), and
        open it."""
        path = self._ask_for_data("Open training data")
        if path:
            self.open_file(path)

    @Slot()
    def _on_val_browse_clicked(self) -> None:
        path = self._ask_for_data("Open validation data")
        if path:
            self.val_edit.setText(path)
            self._schedule_refresh()

    @Slot(object)
    def _on_jobs_analysed(self, analysis: DataAnalysis) -> None:
        try:
            if analysis.spec != self.spec():
                return  # the user changed a setting since: the refresh for it is on its way
        except DataError:
            return
        if analysis.prepared is not None or analysis.error or self.analysis is None:
            self.analysis = analysis  # a preview-only result keeps the last full analysis
        if analysis.table is not None:
            self._columns = analysis.table.columns
        if analysis.prepared is not None:
            self._set_roles(analysis.prepared.format, self.columns.mapping(), analysis.prepared.columns)
            self.overflow.show_format(analysis.prepared.format)
        elif analysis.table is not None:
            chosen = self.format_combo.currentData()
            self._set_roles(None if chosen == "auto" else chosen, self.columns.mapping())
        if analysis.table is not None:
            self.row_spin.blockSignals(True)
            self.row_spin.setRange(1, len(analysis.table.records))
            self.row_spin.blockSignals(False)
        self._show_error(analysis.error or "")
        if analysis.prepared is not None:
            self._show_prepared(analysis)
        elif analysis.error and analysis.preview is None:
            self.summary_label.clear()
            self.bad_rows.set_rows(())
            self.histogram.show_lengths(np.zeros(0, dtype=int), self._max_length)
        self._show_preview(analysis.preview)
        self.sig_analysed.emit(analysis)

    def _show_prepared(self, analysis: DataAnalysis) -> None:
        prepared = analysis.prepared
        assert prepared is not None
        detected = self.format_combo.currentData() == "auto"
        self.detected_label.setText(f"detected: {prepared.format}" if detected else "")
        self.summary_label.setText(summary_html(prepared, *self._batch))
        bad = prepared.bad_rows
        self.bad_rows_label.setText(f"{len(bad):,} bad row{'s' if len(bad) != 1 else ''} (left out of training)"
                                    if bad else "No bad rows")
        self.bad_rows.set_rows(bad)
        fate = OVERFLOW_FATES[prepared.overflow].split(" (")[0]
        self.histogram.show_lengths(prepared.stats.lengths, prepared.stats.max_length, fate)

    def _show_preview(self, preview: Preview | None) -> None:
        self.shown_preview = preview
        if preview is None:
            self.preview_view.clear()
            self.row_label.clear()
            return
        loss = sum(1 for _, carries in preview.tokens if carries)
        cut = f", cut from {preview.length:,}" if preview.truncated else ""
        windows = f" → {preview.windows:,} windows" if preview.windows > 1 else ""
        shown = f" (the first {len(preview.tokens):,} shown)" if len(preview.tokens) < preview.kept else ""
        self.row_label.setText(
            f"{source_label(preview.file)}, line {preview.row} · {preview.format} · {preview.kept:,} tokens{cut}"
            f"{windows}{shown}, {loss} carry the loss" + (f" · label {preview.label}" if preview.label is not None
                                                           else "")
        )
        self.preview_view.setHtml(preview_html(preview))

    def _show_error(self, text: str) -> None:
        self.error_label.setText(text)
        self.error_label.setVisible(bool(text))
