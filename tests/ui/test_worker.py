"""The worker runs a job on its own thread and turns every outcome into a signal delivered on the UI thread."""

from __future__ import annotations

import threading

from PySide6.QtCore import QObject, Slot

from studio.core.errors import ModelSourceError
from studio.ui.worker import BackgroundJob


class Receiver(QObject):
    """Lives on the UI thread, like the window: records what arrives and on which thread."""

    def __init__(self, job: BackgroundJob) -> None:
        super().__init__()
        self.events: list[tuple[str, object, int]] = []
        job.worker.sig_progress.connect(self._on_worker_progress)
        job.worker.sig_result.connect(self._on_worker_result)
        job.worker.sig_failed.connect(self._on_worker_failed)
        job.worker.sig_finished.connect(self._on_worker_finished)

    @Slot(object)
    def _on_worker_progress(self, value: object) -> None:
        self.events.append(("progress", value, threading.get_ident()))

    @Slot(object)
    def _on_worker_result(self, value: object) -> None:
        self.events.append(("result", value, threading.get_ident()))

    @Slot(object)
    def _on_worker_failed(self, value: object) -> None:
        self.events.append(("failed", value, threading.get_ident()))

    @Slot()
    def _on_worker_finished(self) -> None:
        self.events.append(("finished", None, threading.get_ident()))


def run(qtbot, job) -> list[tuple[str, object, int]]:
    background = BackgroundJob(job)
    receiver = Receiver(background)
    background.start()
    qtbot.waitUntil(
        lambda: receiver.events[-1:] != [] and receiver.events[-1][0] == "finished" and not background.is_running(),
        timeout=5000,
    )
    assert background.thread.isFinished()
    return receiver.events


def test_a_job_runs_off_the_ui_thread_and_its_signals_arrive_on_the_ui_thread(qtbot):
    ui_thread = threading.get_ident()

    def job(report):
        report("halfway")
        return threading.get_ident()

    events = run(qtbot, job)
    assert [kind for kind, _, _ in events] == ["progress", "result", "finished"]
    assert events[0][1] == "halfway"
    assert events[1][1] != ui_thread  # the job ran elsewhere
    assert {thread for _, _, thread in events} == {ui_thread}  # every slot ran on the UI thread


def test_a_studio_error_becomes_a_user_failure_with_its_own_line(qtbot):
    def job(report):
        raise ModelSourceError("no such file or folder: /x.gguf")

    events = run(qtbot, job)
    assert [kind for kind, _, _ in events] == ["failed", "finished"]
    failure = events[0][1]
    assert (failure.message, failure.user_error, failure.details) == ("no such file or folder: /x.gguf", True, "")


def test_a_bug_becomes_a_failure_with_its_traceback(qtbot):
    def job(report):
        return 1 / 0

    failure = run(qtbot, job)[0][1]
    assert failure.message == "ZeroDivisionError: division by zero" and not failure.user_error
    assert "Traceback (most recent call last)" in failure.details and "return 1 / 0" in failure.details
