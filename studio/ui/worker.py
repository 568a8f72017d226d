"""Run slow core work off the UI thread (Spyder's pattern).

A `Worker` is a QObject moved to its own QThread: `thread.started -> worker.run`, `sig_finished ->
thread.quit`. `run()` catches every exception and emits it as a `WorkFailed`, so nothing escapes into Qt's
event loop. `BackgroundJob` keeps the Python references to the thread and the worker alive until the thread
has really finished; dropping them earlier is what makes PySide crash with "QThread destroyed while running".
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from PySide6.QtCore import QObject, Qt, QThread, Signal, Slot

from studio.core.errors import StudioError

Report = Callable[[Any], None]
Job = Callable[[Report], Any]  # a job gets a `report(progress)` callable and returns its result


@dataclass(frozen=True)
class WorkFailed:
    """Why a job stopped: `user_error` for a StudioError (show `message` as is), else a bug (`details` holds
    the traceback for the log)."""

    message: str
    user_error: bool
    details: str = ""


class Worker(QObject):
    sig_progress = Signal(object)  # whatever the job reports, e.g. a core Progress
    sig_result = Signal(object)  # the job's return value
    sig_failed = Signal(object)  # WorkFailed
    sig_finished = Signal()  # always last, after sig_result or sig_failed

    def __init__(self, job: Job) -> None:
        super().__init__()
        self._job = job

    @Slot()
    def run(self) -> None:
        try:
            result = self._job(self.sig_progress.emit)
        except StudioError as exc:
            self.sig_failed.emit(WorkFailed(str(exc), user_error=True))
        except BaseException as exc:  # noqa: BLE001 - a bug: reported with its traceback, never raised into Qt
            first_line = (str(exc).strip().splitlines() or [""])[0]
            message = f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__
            self.sig_failed.emit(WorkFailed(message, user_error=False, details=traceback.format_exc()))
        else:
            self.sig_result.emit(result)
        finally:
            self.sig_finished.emit()


class BackgroundJob(QObject):
    """One job on its own thread. Connect to `worker`'s signals before `start()`, using slots of objects that
    live on the UI thread, so Qt queues the calls to that thread."""

    _alive: ClassVar[set["BackgroundJob"]] = set()  # references held until each thread finishes

    def __init__(self, job: Job, name: str = "studio-job") -> None:
        super().__init__()
        self.thread = QThread()
        self.thread.setObjectName(name)
        self.worker = Worker(job)
        self.worker.moveToThread(self.thread)
        self.thread.started.connect(self.worker.run)
        # Direct: QThread.quit is thread-safe, and a queued call would wait for a UI thread that may be
        # blocked in wait() on this very thread (closing the window mid-job).
        self.worker.sig_finished.connect(self.thread.quit, Qt.DirectConnection)
        self.thread.finished.connect(self._on_thread_finished)

    def start(self) -> None:
        BackgroundJob._alive.add(self)
        self.thread.start()

    def is_running(self) -> bool:
        return self in BackgroundJob._alive

    def wait(self, timeout_ms: int = -1) -> bool:
        """Block until the job's thread ends (used when the window closes mid-job)."""
        return self.thread.wait() if timeout_ms < 0 else self.thread.wait(timeout_ms)

    @Slot()
    def _on_thread_finished(self) -> None:
        BackgroundJob._alive.discard(self)

    @classmethod
    def wait_all(cls) -> None:
        for job in list(cls._alive):
            job.wait()
