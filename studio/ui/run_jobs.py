"""The runs panel's work lane: listing the run folders, reading the curves of the ticked runs and a run's last
spectrum snapshot all read files, so they run here, one job at a time, off the UI thread.

Requests coalesce while a job runs: a listing asked for again runs once more afterwards (with the newest
inputs), curves asked for join one set of folders, and only the newest spectrum request waits."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from PySide6.QtCore import QObject, Signal, SignalInstance, Slot

from studio.core import events as ev
from studio.core import run_layout
from studio.core.errors import StudioError
from studio.core.run_layout import is_run_folder
from studio.core.train.run_folder import RunSummary, event_from, read_curves, read_last_record, read_run
from studio.ui.worker import BackgroundJob, Report, WorkFailed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunListing:
    """The runs under `runs_folder` plus the `opened` ones from elsewhere, newest first; `unreadable` holds
    (folder, why) for each folder whose run.yaml could not be read."""

    runs_folder: Path
    opened: tuple[Path, ...]
    runs: tuple[RunSummary, ...]
    unreadable: tuple[tuple[Path, str], ...]


@dataclass(frozen=True)
class LastSpectrum:
    """A run's last spectrum snapshot; None when it recorded none."""

    folder: Path
    snapshot: ev.SpectrumSnapshot | None


def list_runs(runs_folder: Path, opened: tuple[Path, ...]) -> RunListing:
    """Summarise every run folder (one holding run.yaml) under `runs_folder` and among `opened`."""
    candidates = [p for p in runs_folder.iterdir() if is_run_folder(p)] if runs_folder.is_dir() else []
    inside = {p.resolve() for p in candidates}
    candidates += [p for p in opened if p.resolve() not in inside and is_run_folder(p)]
    runs, unreadable = [], []
    for path in sorted(candidates, key=lambda p: p.name, reverse=True):  # names start with their time
        try:
            runs.append(read_run(path))
        except StudioError as exc:
            unreadable.append((path, str(exc)))
    return RunListing(runs_folder, opened, tuple(runs), tuple(unreadable))


def read_last_spectrum(folder: Path) -> LastSpectrum:
    record = read_last_record(folder, run_layout.SPECTRA, "SpectrumSnapshot")
    return LastSpectrum(folder, event_from(record) if record is not None else None)


class RunJobs(QObject):
    sig_listed = Signal(object)  # RunListing
    sig_curves_read = Signal(object)  # dict[str, RunCurves], by run folder
    sig_spectrum_read = Signal(object)  # LastSpectrum
    sig_failed = Signal(str)  # a bug while reading (logged with its traceback): the line to show

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._job: BackgroundJob | None = None
        self._running_kind = ""
        self._running_curves: frozenset[str] = frozenset()
        self._listing: tuple[Path, tuple[Path, ...]] | None = None  # the waiting listing's inputs
        self._curves: set[str] = set()
        self._spectrum: Path | None = None

    def is_listing(self) -> bool:
        return self._running_kind == "listing" or self._listing is not None

    def list_runs(self, runs_folder: Path, opened: Iterable[Path]) -> None:
        self._listing = (runs_folder, tuple(opened))
        self._start_next()

    def read_curves(self, folders: Iterable[str]) -> None:
        """Read these runs' curves, except those being read right now."""
        self._curves |= set(folders) - self._running_curves
        self._start_next()

    def read_spectrum(self, folder: Path) -> None:
        self._spectrum = folder
        self._start_next()

    def _start_next(self) -> None:
        if self._job is not None:
            return
        if self._listing is not None:
            (runs_folder, opened), self._listing = self._listing, None
            self._start("listing", lambda _report: list_runs(runs_folder, opened), self.sig_listed)
        elif self._spectrum is not None:
            folder, self._spectrum = self._spectrum, None
            self._start("spectrum", lambda _report: read_last_spectrum(folder), self.sig_spectrum_read)
        elif self._curves:
            folders, self._curves = frozenset(self._curves), set()
            self._running_curves = folders
            self._start("curves", lambda _report: {f: read_curves(Path(f)) for f in folders},
                        self.sig_curves_read)

    def _start(self, kind: str, job: Callable[[Report], Any], result_signal: SignalInstance) -> None:
        """Run `job`; its result is re-emitted as `result_signal` on the UI thread (a signal of this object, so
        Qt queues it here), before the next job starts."""
        self._running_kind = kind
        self._job = BackgroundJob(job, name=f"runs-{kind}")
        self._job.worker.sig_result.connect(result_signal)
        self._job.worker.sig_failed.connect(self._on_worker_failed)
        self._job.worker.sig_finished.connect(self._on_worker_finished)
        self._job.start()

    @Slot(object)
    def _on_worker_failed(self, failure: WorkFailed) -> None:
        log.error("reading run folders (%s) failed:\n%s", self._running_kind, failure.details)
        self.sig_failed.emit(f"Could not read the run folders: {failure.message}")

    @Slot()
    def _on_worker_finished(self) -> None:
        self._job, self._running_kind, self._running_curves = None, "", frozenset()
        self._start_next()

