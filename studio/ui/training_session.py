"""One training run at a time, on its own thread: the engine's loop runs in a `BackgroundJob` and every core
event it reports comes back to the UI thread as one `sig_event(object)` carrying that frozen dataclass.

The session only translates. It starts `engine.train` (a new run, or one resumed from its latest checkpoint),
hands the engine a `TrainControl` whose flags Pause / Resume / Stop set from the UI thread, and tracks a small
state machine the buttons follow. Nothing here waits for torch: the UI thread sets flags and reacts to signals.

Three things keep the window answering while the loop runs in the same process (tests/ui/test_training_run.py
measures the worst gap between UI heartbeats during a run and holds it under 100 ms):
- the run trains a copy of the window's model made in memory, not one read again from disk (`_copy_of`);
- the training thread runs at a lower CPU priority (`yield_cpu_to_the_window`);
- the interpreter's switch interval is 1 ms during a run (TRAINING_SWITCH_INTERVAL_S).
"""

from __future__ import annotations

import copy
import enum
import logging
import os
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Callable

from PySide6.QtCore import QObject, Signal, Slot

from studio.core import events as ev
from studio.core.errors import StudioError
from studio.core.model.loading import LoadedModel
from studio.core.runconfig import RunConfig, TrainingConfig
from studio.core.train.engine import TrainControl
from studio.core.train.launch import Launch, accelerate_config
from studio.ui.worker import BackgroundJob, Report, WorkFailed

EngineCall = Callable[[TrainControl, Report], "ev.Finished | ev.Failed"]
log = logging.getLogger(__name__)
TRAINING_NICE = 10  # CFS weight 110 against the window's 1024
# While a run trains, a thread that wants the interpreter gets it after at most this long (Python's default
# is 5 ms). A repaint hands the interpreter back and forth with Qt hundreds of times: next to a thread running
# Python code, a ~70 ms repaint of the train panel took ~1.5 s at 5 ms and ~0.35 s at 1 ms.
TRAINING_SWITCH_INTERVAL_S = 0.001


def _copy_of(base: LoadedModel | None) -> LoadedModel | None:
    """A private copy of the window's model for PEFT to wrap. Copying weights in memory lets the window's
    thread run every few milliseconds, while reading them again from disk (transformers' loader) holds the
    interpreter for ~150 ms stretches. The tokenizer is shared: the data panel formats with its own copy."""
    if base is None:
        return None
    return replace(base, model=copy.deepcopy(base.model))


def _launch_plan(processes: int, sharded: bool, config: str | None = None) -> Launch:
    """One process per GPU; under `config` (a shipped accelerate config's name or a file), by default the shipped
    FSDP one with `sharded`."""
    config = config or ("fsdp" if sharded else None)
    return Launch(processes, config_file=str(accelerate_config(config)) if config else None)


def yield_cpu_to_the_window() -> None:
    """Lower this thread's scheduling priority (Linux: nice is per thread, and torch's OpenMP workers, which
    this thread starts, inherit it). Training still gets every idle cycle, but when the window needs to
    repaint, the kernel runs it first instead of sharing the cores with the optimizer's threads."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), TRAINING_NICE)
        except OSError:  # not allowed here: train at normal priority
            pass


class SessionState(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    PAUSING = "pausing"  # asked; the loop pauses after the step it is in
    PAUSED = "paused"
    STOPPING = "stopping"  # asked; the loop saves a checkpoint and the adapter, then ends


class TrainingSession(QObject):
    sig_event = Signal(object)  # every core event, in order, on the UI thread
    sig_state_changed = Signal(object)  # SessionState
    sig_finished = Signal(object)  # the run's last event: Finished or Failed

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.state = SessionState.IDLE
        self.run_dir: Path | None = None  # the run started or resumed last
        self.last_result: ev.Finished | ev.Failed | None = None
        self._control = TrainControl()
        self._job: BackgroundJob | None = None
        self._switch_interval = sys.getswitchinterval()

    # ---- starting -------------------------------------------------------------------------------------------

    def start(self, config: RunConfig, base: LoadedModel | None = None, processes: int = 1,
              sharded: bool = False) -> bool:
        """Train `config` from scratch in a new run folder under its output_dir. False while a run is active.

        `base`: the model the window has open, when it is what the engine would open for `config`; the run
        trains a private copy of it instead of reading the weights again (see `_copy_of`). `processes` > 1: one
        process per GPU, started through accelerate (launch.py); their events arrive here the same way.
        `sharded`: those processes shard the base between them (FSDP)."""
        from studio.core.train import engine, launch

        if processes > 1:
            return self._launch(lambda control, report: launch.train_on_processes(
                config, _launch_plan(processes, sharded), report, control))
        return self._launch(lambda control, report: engine.train(config, report, control, loaded=_copy_of(base)))

    def resume_run(self, run_dir: str | Path, training: TrainingConfig | None = None,
                   base: LoadedModel | None = None) -> bool:
        """Continue `run_dir` from its latest checkpoint, optionally with changed training settings (a new step
        budget, a lower learning rate after the loss became NaN); `base` as in start."""
        from studio.core import run_layout
        from studio.core.runconfig import load
        from studio.core.train import engine, launch

        self.run_dir = Path(run_dir)

        def run(control: TrainControl, report: Report) -> ev.Finished | ev.Failed:
            try:
                config = load(Path(run_dir) / run_layout.RUN_FILE)
                processes, sharded = launch.as_trained(run_dir)  # a resume launches as the run was trained
                accelerate_config, gone = launch.config_as_trained(run_dir, sharded)
                plan = _launch_plan(processes, sharded, accelerate_config)  # a config file of one's own checked
            except StudioError as exc:
                failed = ev.Failed(str(exc), 0)
                report(failed)
                return failed
            if processes > 1 or sharded:  # its processes read the run's own run.yaml; only the step budget travels
                if gone:
                    report(ev.LogMessage(gone, "warning"))
                how = launch.how_trained(processes, sharded, accelerate_config)
                report(ev.LogMessage(f"Resuming {how}, as the run was trained"))
                changed = training is not None and replace(training, max_steps=config.training.max_steps) != \
                    config.training
                if changed:
                    failed = ev.Failed(f"a run on {processes} GPUs resumes with its own settings: only Max steps can "
                                       "change (start a new run for other settings)", 0)
                    report(failed)
                    return failed
                return launch.resume_on_processes(run_dir, plan, report, control,
                                                  max_steps=training.max_steps if training else None)
            if training is not None:
                config = replace(config, training=training)
            return engine.train(config, report, control, resume_from=run_dir, loaded=_copy_of(base))

        return self._launch(run)

    def _launch(self, run: EngineCall) -> bool:
        if self._job is not None:
            return False
        control = self._control = TrainControl()
        self.last_result = None

        def job(report: Report) -> ev.Finished | ev.Failed:
            from studio.ui.model_loader import import_libraries

            import_libraries()  # frozen out of the collector before the loop allocates (see model_loader)
            yield_cpu_to_the_window()
            return run(control, report)

        self._job = BackgroundJob(job, name="training")
        self._job.worker.sig_progress.connect(self._on_worker_progress)
        self._job.worker.sig_failed.connect(self._on_worker_failed)
        self._job.worker.sig_finished.connect(self._on_worker_finished)
        self._set_state(SessionState.RUNNING)
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, TRAINING_SWITCH_INTERVAL_S))
        self._job.start()
        return True

    # ---- control (UI thread) ----------------------------------------------------------------------------------

    def is_active(self) -> bool:
        return self._job is not None

    def pause(self) -> None:
        if self.state == SessionState.RUNNING:
            self._control.request_pause()
            self._set_state(SessionState.PAUSING)

    def unpause(self) -> None:
        if self.state in (SessionState.PAUSING, SessionState.PAUSED):
            self._control.resume()
            self._set_state(SessionState.RUNNING)

    def stop(self) -> None:
        """Ask the loop to end after its current step; it keeps a checkpoint and saves the adapter."""
        if self._job is not None and self.state != SessionState.STOPPING:
            self._control.request_stop()
            self._set_state(SessionState.STOPPING)

    # ---- from the worker --------------------------------------------------------------------------------------

    @Slot(object)
    def _on_worker_progress(self, event: object) -> None:
        if isinstance(event, ev.RunStarted):
            self.run_dir = Path(event.run_dir)
        elif isinstance(event, ev.Paused) and self.state == SessionState.PAUSING:
            self._set_state(SessionState.PAUSED)
        elif isinstance(event, (ev.Finished, ev.Failed)):
            self.last_result = event
            if isinstance(event, ev.Finished):
                self.run_dir = Path(event.run_dir)
        self.sig_event.emit(event)

    @Slot(object)
    def _on_worker_failed(self, failure: WorkFailed) -> None:
        """The engine never raises for user problems; this is a bug that escaped it. Shown like a failure."""
        failed = ev.Failed(f"internal error: {failure.message}", 0)
        if failure.details:
            log.error("training crashed:\n%s", failure.details)
        self.last_result = failed
        self.sig_event.emit(failed)

    @Slot()
    def _on_worker_finished(self) -> None:
        self._job = None
        sys.setswitchinterval(self._switch_interval)
        self._set_state(SessionState.IDLE)
        if self.last_result is not None:
            self.sig_finished.emit(self.last_result)

    def _set_state(self, state: SessionState) -> None:
        if state != self.state:
            self.state = state
            self.sig_state_changed.emit(state)
