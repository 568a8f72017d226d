"""The data panel's work lane: reading, formatting and tokenizing run here, one job at a time, off the UI
thread, with the lane's own copy of the model's tokenizer. A fast tokenizer that changes its truncation
setting while another thread encodes with it fails with "Already borrowed"; a training run uses the original.

Requests coalesce: while a job runs, only the newest request waits, and a waiting full analysis absorbs a
preview request (it previews too)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QObject, Signal, Slot

from studio.core.data.dataset import DataSpec, PreparedData, Preview, prepare, preview
from studio.core.data.tables import Table, read_table
from studio.core.errors import DataError
from studio.ui.worker import BackgroundJob, Report, WorkFailed

log = logging.getLogger(__name__)
NO_TOKENIZER = "open a model with a tokenizer to see how the data is formatted and tokenized"


@dataclass(frozen=True)
class DataAnalysis:
    """What one job found. `prepared` is None for a preview-only job or when preparing failed (`error`)."""

    spec: DataSpec
    table: Table | None
    prepared: PreparedData | None
    preview: Preview | None
    error: str | None = None


@dataclass(frozen=True)
class _Request:
    spec: DataSpec
    row: int  # 0-based, counting bad rows
    full: bool  # prepare the whole file, not only preview a row


def analyse(spec: DataSpec, row: int, full: bool, tokenizer: Any | None, table: Table | None) -> DataAnalysis:
    """Read (unless `table` is given), prepare when `full`, and preview `row`; DataErrors become `error`."""
    try:
        table = table or read_table(spec.train_path, spec.txt_mode)
    except DataError as exc:
        return DataAnalysis(spec, None, None, None, str(exc))
    if tokenizer is None:
        return DataAnalysis(spec, table, None, None, NO_TOKENIZER)
    prepared, error = None, None
    if full:
        try:
            prepared = prepare(spec, tokenizer)
        except DataError as exc:
            error = str(exc)
    try:
        shown = preview(spec, tokenizer, min(max(row, 0), len(table.records) - 1), table)
    except DataError as exc:
        shown, error = None, error or str(exc)
    return DataAnalysis(spec, table, prepared, shown, error)


class LaneTokenizer:
    """The lane's copy of a tokenizer, made on the lane's thread the first time a job needs it (copying a fast
    tokenizer holds the interpreter ~150 ms: never on the UI thread)."""

    def __init__(self, source: Any) -> None:
        self._source = source
        self._copy: Any | None = None

    def get(self) -> Any:
        if self._copy is None:
            self._copy = copy.deepcopy(self._source)
        return self._copy


class DataJobs(QObject):
    sig_analysed = Signal(object)  # DataAnalysis

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._tokenizer: LaneTokenizer | None = None
        self._job: BackgroundJob | None = None
        self._waiting: _Request | None = None
        self._running: _Request | None = None
        self._table: Table | None = None  # the last file read, reused to preview other rows of it

    def set_tokenizer(self, tokenizer: Any | None) -> None:
        self._tokenizer = LaneTokenizer(tokenizer) if tokenizer is not None else None

    def is_busy(self) -> bool:
        return self._job is not None or self._waiting is not None

    def analyse(self, spec: DataSpec, row: int) -> None:
        self._submit(_Request(spec, row, full=True))

    def preview(self, spec: DataSpec, row: int) -> None:
        self._submit(_Request(spec, row, full=False))

    def _submit(self, request: _Request) -> None:
        if self._waiting is not None and self._waiting.full and not request.full:
            request = _Request(request.spec, request.row, full=True)
        self._waiting = request
        if self._job is None:
            self._start_waiting()

    def _start_waiting(self) -> None:
        request, self._waiting = self._waiting, None
        if request is None:
            return
        self._running = request
        table = self._table
        if request.full or table is None or table.path != str(request.spec.train_path):
            table = None  # a full analysis reads the file again: it may have changed on disk
        lane = self._tokenizer

        def job(_report: Report) -> DataAnalysis:
            return analyse(request.spec, request.row, request.full, lane.get() if lane else None, table)

        self._job = BackgroundJob(job, name="data")
        self._job.worker.sig_result.connect(self._on_worker_result)
        self._job.worker.sig_failed.connect(self._on_worker_failed)
        self._job.worker.sig_finished.connect(self._on_worker_finished)
        self._job.start()

    @Slot(object)
    def _on_worker_result(self, analysis: DataAnalysis) -> None:
        if analysis.table is not None:
            self._table = analysis.table
        if self._waiting is None or not self._waiting.full:  # else a newer full analysis supersedes this one
            self.sig_analysed.emit(analysis)

    @Slot(object)
    def _on_worker_failed(self, failure: WorkFailed) -> None:
        """A bug in reading or formatting (DataErrors never get here): shown as the analysis' error."""
        assert self._running is not None
        log.error("analysing %s failed:\n%s", self._running.spec.train_path, failure.details)
        self.sig_analysed.emit(DataAnalysis(self._running.spec, None, None, None, failure.message))

    @Slot()
    def _on_worker_finished(self) -> None:
        self._job = self._running = None
        self._start_waiting()
