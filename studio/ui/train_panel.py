"""The train panel: hyperparameters, Start / Pause / Resume / Stop, progress with ETA and throughput, the live
curves and a log of what the run reported. It builds the run's `RunConfig` from the plan being edited, the
open model and the data panel's `DataSpec`, and hands it to a `TrainingSession`; it only reacts to events."""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable

from PySide6.QtCore import QSettings, Qt, Signal, Slot
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSplitter,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from studio.core import events as ev
from studio.core import run_layout
from studio.core.data.dataset import DataSpec
from studio.core.errors import StudioError
from studio.core.model.loading import LoadedModel
from studio.core.runconfig import ModelConfig, RunConfig, TrainingConfig, load, remote_code_warning, save
from studio.core.train.checkpoints import latest_checkpoint
from studio.core.train.run_folder import event_from, latest_history, read_records
from studio.ui.model_loader import OpenedModel
from studio.ui.plan_state import PlanState
from studio.ui.plots import TrainingPlots
from studio.ui.training_form import TrainingForm
from studio.ui.training_session import SessionState, TrainingSession
from studio.ui.worker import BackgroundJob, WorkFailed

DEFAULT_RUNS_DIR = Path.home() / "lora-studio" / "runs"
LEVEL_COLOUR = {"info": "#303030", "warning": "#b26a00", "error": "#c62828", "event": "#1f5fa8"}
ERROR_STYLE = "color: #b3261e; font-weight: bold;"
SPEED_TEMPLATE = "ETA 00:00:00 · 000,000 real tokens/s "


def format_duration(seconds: float) -> str:
    """1:02:03, 4:05 or 0:07: what a progress bar's ETA reads like."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass(frozen=True)
class RunHistory:
    """A run's curves as they stand (a resume from an earlier checkpoint replaced the steps after it)."""

    run_dir: Path
    steps: tuple[ev.StepMetrics, ...]
    evals: tuple[ev.EvalMetrics, ...]


def run_history(run_dir: Path) -> RunHistory:
    steps, evals = latest_history(read_records(run_dir))
    return RunHistory(run_dir, tuple(event_from(r) for r in steps), tuple(event_from(r) for r in evals))


def _log_level(event: object) -> str:
    """The colour of an event's line in the log: a message's own level, failures as errors, checkpoints plain and
    the run's milestones (start, evaluations, pause, end) as events."""
    if isinstance(event, ev.LogMessage):
        return event.level
    if isinstance(event, ev.Failed):
        return "error"
    return "info" if isinstance(event, ev.CheckpointSaved) else "event"


class TrainPanel(QWidget):
    sig_run_finished = Signal(object)  # Finished or Failed, after the panel has shown it

    def __init__(self, plan_state: PlanState, data_spec: Callable[[], DataSpec], settings: QSettings,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._plan_state = plan_state
        self._data_spec = data_spec
        self._settings = settings
        self._opened: OpenedModel | None = None
        self.quantization: str | None = None  # "4bit" when the adapter panel asks for QLoRA (set_qlora)
        self.failure_dialog: QMessageBox | None = None
        self.remote_code_dialog: QMessageBox | None = None
        self._history_job: BackgroundJob | None = None  # reading the curves of a run about to resume
        self._form_as_run: TrainingConfig | None = None  # the form's settings when it last showed the run's own
        self.session = TrainingSession(self)
        self.session.sig_event.connect(self._on_session_event)
        self.session.sig_state_changed.connect(self._on_session_state_changed)
        self._build()
        self._on_max_steps_changed(self.form.max_steps.value())
        self._update_buttons()

    # ---- layout ---------------------------------------------------------------------------------------------

    def _build(self) -> None:
        self.form = TrainingForm()
        self.runs_dir_edit = QLineEdit(str(self._settings.value("paths/runs", str(DEFAULT_RUNS_DIR))))
        self.runs_dir_edit.setToolTip("Each run gets its own folder here: run.yaml, metrics, checkpoints, adapter")
        self.runs_dir_edit.editingFinished.connect(
            lambda: self._settings.setValue("paths/runs", self.runs_dir_edit.text()))
        browse = QPushButton("…")
        browse.setMaximumWidth(32)
        browse.clicked.connect(self._on_browse_clicked)
        runs_row = QHBoxLayout()
        runs_row.addWidget(self.runs_dir_edit, 1)
        runs_row.addWidget(browse)
        self.save_config_button = QPushButton("Save run config…")
        self.save_config_button.setToolTip("Write run.yaml for `lora-studio train` (same run, no window)")
        self.save_config_button.clicked.connect(self.save_config)

        self.fold_button = QToolButton()
        self.fold_button.setText("Hyperparameters")
        self.fold_button.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        self.fold_button.setCheckable(True)
        self.fold_button.setChecked(True)
        self.fold_button.setAutoRaise(True)
        self.fold_button.toggled.connect(self._on_fold_toggled)
        self.settings_box = QWidget()
        settings_layout = QVBoxLayout(self.settings_box)
        settings_layout.setContentsMargins(12, 0, 0, 4)
        settings_layout.addWidget(self.form)
        runs_row.insertWidget(0, QLabel("Runs folder"))
        runs_row.addWidget(self.save_config_button)
        settings_layout.addLayout(runs_row)
        self._on_fold_toggled(True)
        self.form.max_steps.valueChanged.connect(self._on_max_steps_changed)

        self.start_button = QPushButton("Start")
        self.pause_button = QPushButton("Pause")
        self.resume_button = QPushButton("Resume")
        self.stop_button = QPushButton("Stop")
        self.start_button.setToolTip("Train the plan on the data with these settings, in a new run folder")
        self.pause_button.setToolTip("Pause after the current step (a checkpoint is saved)")
        self.resume_button.setToolTip("Continue a paused run, or a stopped one from its latest checkpoint")
        self.stop_button.setToolTip("End after the current step; keeps a checkpoint and saves the adapter")
        self.start_button.clicked.connect(self.start)
        self.pause_button.clicked.connect(self.session.pause)
        self.resume_button.clicked.connect(self.resume)
        self.stop_button.clicked.connect(self.session.stop)
        buttons = QHBoxLayout()
        for button in (self.start_button, self.pause_button, self.resume_button, self.stop_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("step %v / %m")
        self.speed_label = QLabel("Not started")
        # a fixed width: a label that resized with its text would re-lay out (and repaint) every plot per step
        self.speed_label.setFixedWidth(self.speed_label.fontMetrics().horizontalAdvance(SPEED_TEMPLATE))
        self.error_label = QLabel()
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet(ERROR_STYLE)
        self.error_label.hide()

        self.plots = TrainingPlots()
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(5000)
        self.log_view.setPlaceholderText("What the run reports: checkpoints, evaluations, warnings, failures")
        plots_split = QSplitter(Qt.Vertical)
        plots_split.addWidget(self.plots)
        plots_split.addWidget(self.log_view)
        plots_split.setStretchFactor(0, 4)
        plots_split.setStretchFactor(1, 1)
        plots_split.setSizes([640, 140])  # the plots fill in on first show; keep the room for them

        status_row = QHBoxLayout()
        status_row.addWidget(self.progress, 1)
        status_row.addWidget(self.speed_label)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(buttons)
        layout.addLayout(status_row)
        layout.addWidget(self.error_label)
        layout.addWidget(self.fold_button)
        layout.addWidget(self.settings_box)
        layout.addWidget(plots_split, 1)

    @Slot(int)
    def _on_max_steps_changed(self, max_steps: int) -> None:
        """Before a run, the progress bar and the plots' step axis show the run the form describes."""
        if not self.session.is_active():
            self.progress.setRange(0, max_steps)
            self.plots.set_step_range(max_steps)

    @Slot(bool)
    def _on_fold_toggled(self, unfolded: bool) -> None:
        """The settings fold away while a run trains (Start folds them), leaving the height to the plots."""
        self.settings_box.setVisible(unfolded)
        self.fold_button.setArrowType(Qt.DownArrow if unfolded else Qt.RightArrow)

    # ---- the run's configuration ------------------------------------------------------------------------------

    def set_model(self, opened: OpenedModel | None) -> None:
        self._opened = opened
        self.form.set_gpu_count(opened.machine.gpu_count if opened is not None else 0)
        self._update_buttons()

    def runs_dir(self) -> Path:
        return Path(self.runs_dir_edit.text().strip() or DEFAULT_RUNS_DIR).expanduser()

    @Slot(bool)
    def set_qlora(self, on: bool) -> None:
        self.quantization = "4bit" if on else None

    def set_runs_dir(self, folder: str | Path) -> None:
        self.runs_dir_edit.setText(str(folder))
        self._settings.setValue("paths/runs", str(folder))

    def run_config(self) -> RunConfig:
        """The run as the window shows it now. Raises StudioError naming what is missing or wrong."""
        if self._opened is None:
            raise StudioError("open a model first")
        if self._opened.plan_only:
            raise StudioError(f"{self._opened.loaded.display_name} is open in plan mode: training needs its weights")
        loaded = self._opened.loaded
        model = ModelConfig(source=self._opened.spec, task=loaded.task, quantization=self.quantization,
                            num_labels=int(getattr(loaded.model.config, "num_labels", 2) or 2))
        data = replace(self._data_spec(), max_length=self.form.max_length.value())
        raw = RunConfig(model=model, plan=self._plan_state.plan.to_dict(), data=data.to_dict(),
                        training=self.form.training_config(), output_dir=str(self.runs_dir())).to_dict()
        return RunConfig.from_dict(raw)  # the same checks as a run file gets

    def _base_for(self, config: RunConfig) -> LoadedModel | None:
        """The window's open model when the engine would open exactly that for `config` (same source, full
        precision on the CPU); else None and the engine opens its own (4-bit, or bfloat16 on a GPU)."""
        opened = self._opened
        if opened is None or opened.plan_only or opened.machine.has_cuda:
            return None
        same = (config.model.source == opened.spec and config.model.quantization is None and config.model.dtype is None
                and config.model.task == opened.loaded.task and config.model.device in ("auto", "cpu"))
        return opened.loaded if same else None

    # ---- actions --------------------------------------------------------------------------------------------

    @Slot()
    def start(self) -> bool:
        try:
            config = self.run_config()
        except StudioError as exc:
            self._show_error(f"Cannot start: {exc}")
            return False
        self._show_error("")
        self.plots.clear()
        self.log_view.clear()
        self.fold_button.setChecked(False)
        steps = self.form.max_steps.value()  # in epochs too: the form keeps it at the steps the epochs are
        self._log(f"Starting: {len(config.plan['targets'])} target modules, {steps} steps")
        self.progress.setRange(0, steps)
        self.progress.setValue(0)
        self._form_as_run = config.training
        processes, sharded = self.form.processes(), self.form.sharded()
        if processes > 1:
            shards = ", the base sharded between them (FSDP)" if sharded else ""
            self._log(f"Training on {processes} GPUs, one process each (accelerate launch){shards}")
        return self.session.start(config, self._base_for(config), processes, sharded)

    @Slot()
    def resume(self) -> None:
        """Unpause a paused run; after a run ended, continue it from its latest checkpoint."""
        if self.session.state in (SessionState.PAUSING, SessionState.PAUSED):
            self.session.unpause()
            return
        run_dir = self.session.run_dir
        checkpoint = latest_checkpoint(run_dir) if run_dir is not None else None
        if run_dir is None or checkpoint is None:
            self._show_error("Nothing to resume: this run has no checkpoint")
            return
        try:
            config = load(run_dir / run_layout.RUN_FILE)
            base = self._base_for(config)
        except StudioError as exc:
            self._show_error(f"Cannot resume: {exc}")
            return
        self._show_error("")
        training = self._changed_in_form(config.training)
        self._warn_about_remote_code(config)
        self._log(f"Resuming {run_dir} from {checkpoint.name}, up to step {training.max_steps}")
        self.session.resume_run(run_dir, training=training, base=base)

    def _changed_in_form(self, own: TrainingConfig) -> TrainingConfig:
        """The run's own training settings with each one the person changed in the form since it showed the run.
        The form rounds some values (12 decimals, 4 for warmup): a field left alone keeps the run's exact value."""
        now = self.form.training_config(own)
        if self._form_as_run is None:
            return now
        return replace(own, **{f.name: getattr(now, f.name) for f in fields(TrainingConfig)
                               if getattr(now, f.name) != getattr(self._form_as_run, f.name)})

    def _warn_about_remote_code(self, config: RunConfig) -> None:
        """A run file that lets the model run its own code: said in a dialog and the log, once per start."""
        warning = remote_code_warning(config)
        if warning:
            self._log(warning, "warning")
            self.remote_code_dialog = QMessageBox(QMessageBox.Warning, "This run runs the model's own code",
                                                  warning[0].upper() + warning[1:], parent=self)
            self.remote_code_dialog.open()  # window-modal without blocking the event loop

    def continue_run(self, run_dir: str | Path) -> None:
        """Reopen a run folder: its settings go into the form and its curves into the plots, then it resumes
        from its latest checkpoint (raise Max steps first to train it further)."""
        if self.session.is_active():
            self._show_error("A run is training: stop it before resuming another")
            return
        run_dir = Path(run_dir)
        try:
            config = load(run_dir / run_layout.RUN_FILE)
        except StudioError as exc:
            self._show_error(f"Cannot resume: {exc}")
            return
        if self._history_job is not None and self._history_job.is_running():
            return  # already reading a run's curves: that run resumes once they are in
        self.form.set_training_config(config.training)
        self._form_as_run = self.form.training_config(config.training)
        self.form.max_length.setValue(int(config.data.get("max_length", self.form.max_length.value())))
        self.plots.clear()
        self.plots.set_step_range(self.form.max_steps.value())
        self.log_view.clear()
        self._log(f"Reading the curves of {run_dir}")
        # a long run's metrics.jsonl takes seconds to read: off the UI thread, then the run resumes
        self._history_job = BackgroundJob(lambda _report: run_history(run_dir), name="run-history")
        self._history_job.worker.sig_result.connect(self._on_history_read)
        self._history_job.worker.sig_failed.connect(self._on_history_failed)
        self._history_job.start()

    @Slot(object)
    def _on_history_read(self, history: RunHistory) -> None:
        for step in history.steps:
            self.plots.add_step(step)
        for evaluation in history.evals:
            self.plots.add_eval(evaluation)
        self.session.run_dir = history.run_dir
        self.resume()

    @Slot(object)
    def _on_history_failed(self, failure: WorkFailed) -> None:
        self._show_error(f"Cannot resume: {failure.message}")

    @Slot()
    def save_config(self) -> None:
        """Ask where, and write the run as run.yaml (the button and File ▸ Save run config…)."""
        try:
            config = self.run_config()
        except StudioError as exc:
            self._show_error(f"Cannot save the run config: {exc}")
            return
        start = Path(str(self._settings.value("paths/run_config", str(self.runs_dir())))) / "run.yaml"
        path, _ = QFileDialog.getSaveFileName(self, "Save the run config", str(start), "Run config (*.yaml *.yml)")
        if not path:
            return
        self._settings.setValue("paths/run_config", str(Path(path).parent))
        try:
            save(config, path)
        except StudioError as exc:
            self._show_error(str(exc))
            return
        self._show_error("")
        self._log(f"Run config saved to {path} (run it with: lora-studio train {path})")

    @Slot()
    def _on_browse_clicked(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder for the runs", str(self.runs_dir()))
        if folder:
            self.set_runs_dir(folder)

    # ---- events ---------------------------------------------------------------------------------------------

    @Slot(object)
    def _on_session_event(self, event: object) -> None:
        text = ev.describe(event)  # type: ignore[arg-type]
        if text is not None:
            self._log(text, _log_level(event))
        if isinstance(event, ev.StepMetrics):
            self.plots.add_step(event)
            self.progress.setRange(0, event.total_steps)
            self.progress.setValue(event.step)
            # real tokens: padding is not counted (the plots' header says how much of each step was padding)
            self.speed_label.setText(f"ETA {format_duration(event.eta_s)} · {event.tokens_per_s:,.0f} real tokens/s")
            self.speed_label.setToolTip(f"Elapsed {format_duration(event.elapsed_s)}, {event.tokens_seen:,} tokens "
                                        f"seen, epoch {event.epoch:.2f}")
        elif isinstance(event, ev.EvalMetrics):
            self.plots.add_eval(event)
        elif isinstance(event, ev.RunStarted):
            if event.start_step:
                self.plots.truncate_after(event.start_step)
            self.plots.set_step_range(event.total_steps)
            self.progress.setRange(0, event.total_steps)
            self.progress.setValue(event.start_step)
        elif isinstance(event, ev.Finished):
            self.sig_run_finished.emit(event)
        elif isinstance(event, ev.Failed):
            self._on_failed(event)

    def _on_failed(self, failed: ev.Failed) -> None:
        where = (f"\n\nThe last checkpoint is {failed.checkpoint}: Resume continues from there, with the settings "
                 "the form shows (change them first if the message asks for it)."
                 if failed.checkpoint else "\n\nNo checkpoint was saved before this point.")
        self.failure_dialog = QMessageBox(QMessageBox.Warning, "Training stopped", failed.message + where,
                                          parent=self)
        self.failure_dialog.open()  # window-modal without blocking the event loop
        self.sig_run_finished.emit(failed)

    @Slot(object)
    def _on_session_state_changed(self, _state: SessionState) -> None:
        self._update_buttons()

    def _update_buttons(self) -> None:
        state = self.session.state
        idle = state == SessionState.IDLE
        can_train = self._opened is not None and not self._opened.plan_only
        resumable = self.session.run_dir is not None and latest_checkpoint(self.session.run_dir) is not None
        self.start_button.setEnabled(idle and can_train)
        self.pause_button.setEnabled(state == SessionState.RUNNING)
        self.resume_button.setEnabled(state in (SessionState.PAUSING, SessionState.PAUSED) or (idle and resumable))
        self.stop_button.setEnabled(state in (SessionState.RUNNING, SessionState.PAUSING, SessionState.PAUSED))
        self.save_config_button.setEnabled(can_train)
        if state == SessionState.STOPPING:
            self.speed_label.setText("Stopping: saving a checkpoint and the adapter…")
        elif state == SessionState.PAUSED:
            self.speed_label.setText("Paused")

    def _show_error(self, text: str) -> None:
        self.error_label.setText(text)
        self.error_label.setVisible(bool(text))

    def _log(self, text: str, level: str = "info") -> None:
        colour = LEVEL_COLOUR.get(level, LEVEL_COLOUR["info"])
        stamp = time.strftime("%H:%M:%S")
        self.log_view.appendHtml(f'<span style="color:#888888">{stamp}</span> '
                                 f'<span style="color:{colour}">{html.escape(text)}</span>')
