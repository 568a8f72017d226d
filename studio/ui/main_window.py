"""The studio's main window: module tree and adapter panel as docks, a tab area for the work panels (data,
train, spectrum, playground and runs join it through `add_panel`), a status bar that shows loading progress,
and the menus (File in file_menu.py, Adapter in adapter_actions.py). Settings persist through the QSettings the
window is given."""

from __future__ import annotations

import logging
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

from PySide6.QtCore import QSettings, Qt, QUrl, Signal, Slot
from PySide6.QtGui import QAction, QCloseEvent, QDesktopServices, QGuiApplication
from PySide6.QtWidgets import (
    QDockWidget,
    QLabel,
    QMainWindow,
    QMenu,
    QMessageBox,
    QProgressBar,
    QScrollArea,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from studio.core.errors import StudioError
from studio.core.events import Failed, Finished, ModuleSpectrum
from studio.core.progress import Progress
from studio.core.units import human_count
from studio.ui.adapter_actions import AdapterActions
from studio.ui.adapter_panel import AdapterPanel
from studio.ui.data_panel import DataPanel
from studio.ui.file_menu import FileMenu
from studio.ui.model_loader import OpenedModel, load_model
from studio.ui.model_summary import ModelSummary
from studio.ui.module_tree_panel import ModuleTreePanel
from studio.ui.plan_state import PlanState
from studio.ui.playground import Playground
from studio.ui.runs_panel import RunsPanel
from studio.ui.spectrum_panel import SpectrumPanel
from studio.ui.train_panel import TrainPanel
from studio.ui.worker import BackgroundJob, Report, WorkFailed

ORGANIZATION = "LoRA Studio"
APPLICATION = "lora-studio"
VERSIONED = ("torch", "transformers", "peft", "PySide6-Essentials", "pyqtgraph")  # named in About and bug reports
TREE_WIDTH, ADAPTER_WIDTH = 520, 380  # first-run dock widths (the work panels take the middle); then saved state
FIRST_PRESET = "peft-default"  # what PEFT itself would target without target_modules
BANNER_STYLE = "background: #fff4ce; color: #5c4400; border: 1px solid #e0c46c; padding: 6px;"
log = logging.getLogger(__name__)


class MainWindow(QMainWindow):
    sig_model_opened = Signal(object)  # OpenedModel, once the window shows it
    sig_model_failed = Signal(object)  # WorkFailed

    def __init__(self, settings: QSettings, log_path: Path | None = None, parent: QWidget | None = None,
                 loader: Callable[[str, Report], OpenedModel] = load_model) -> None:
        super().__init__(parent)
        self.settings = settings
        self._log_path = log_path
        self._loader = loader
        self.opened: OpenedModel | None = None
        self.error_dialog: QMessageBox | None = None
        self._load_job: BackgroundJob | None = None
        self._load_started = 0.0
        self.setWindowTitle("LoRA Studio")
        self.setDockOptions(QMainWindow.AnimatedDocks | QMainWindow.AllowTabbedDocks)

        self.plan_state = PlanState(self)
        self.tree_panel = ModuleTreePanel(self.plan_state)
        self.adapter_panel = AdapterPanel(self.plan_state)
        self.summary = ModelSummary()
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.data_panel = DataPanel(settings)
        self.train_panel = TrainPanel(self.plan_state, self.data_panel.spec, settings)
        self.spectrum_panel = SpectrumPanel()
        self.runs_panel = RunsPanel(self.train_panel.runs_dir)
        self.playground = Playground()
        for panel, title in ((self.summary, "Model"), (self.data_panel, "Data"), (self.train_panel, "Train"),
                             (self.spectrum_panel, "Spectrum"), (self.runs_panel, "Runs"),
                             (self.playground, "Playground")):
            self.add_panel(panel, title)
        self.close_question: QMessageBox | None = None
        self._close_after_stop = False
        self.plan_banner = QLabel()
        self.plan_banner.setWordWrap(True)
        self.plan_banner.setStyleSheet(BANNER_STYLE)
        self.plan_banner.hide()
        central = QWidget()
        layout = QVBoxLayout(central)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.plan_banner)
        layout.addWidget(self.tabs, 1)
        self.setCentralWidget(central)
        self.tree_dock = self._dock("Modules", "modules-dock", self.tree_panel, Qt.LeftDockWidgetArea)
        self.adapter_dock = self._dock("Adapter", "adapter-dock", self.adapter_panel, Qt.RightDockWidgetArea)
        self.resizeDocks([self.tree_dock, self.adapter_dock], [TREE_WIDTH, ADAPTER_WIDTH], Qt.Horizontal)

        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setMaximumWidth(220)
        self.progress_bar.hide()
        self.status_label = QLabel("Ready")
        self.statusBar().addWidget(self.status_label, 1)
        self.statusBar().addPermanentWidget(self.progress_bar)
        self._build_menus()
        self._connect_file_menu()
        self._connect_panels()
        self.resize(1440, 900)
        self._restore_settings()

    # ---- layout -------------------------------------------------------------------------------------------

    def _dock(self, title: str, name: str, widget: QWidget, area: Qt.DockWidgetArea) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(name)  # saveState() needs names to put docks back where the user left them
        dock.setWidget(widget)
        dock.setFeatures(QDockWidget.DockWidgetMovable | QDockWidget.DockWidgetFloatable)
        self.addDockWidget(area, dock)
        return dock

    def add_panel(self, widget: QWidget, title: str) -> None:
        """A work panel in the central tab area (data, train, spectrum, playground, runs). It scrolls when the
        window is narrower than the panel, so the window itself can be as narrow as the user likes."""
        scroll = QScrollArea()
        scroll.setWidget(widget)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.NoFrame)
        self.tabs.addTab(scroll, title)

    def show_panel(self, widget: QWidget) -> None:
        index = next(i for i in range(self.tabs.count()) if self.tabs.widget(i).widget() is widget)
        self.tabs.setCurrentIndex(index)

    def current_panel(self) -> QWidget:
        return self.tabs.currentWidget().widget()

    def _build_menus(self) -> None:
        self.file_menu = FileMenu(self, self.menuBar().addMenu("&File"), self.settings, self.train_panel.runs_dir)
        self.open_actions = self.file_menu.open_actions
        self.adapter_actions = AdapterActions(self, self.menuBar().addMenu("&Adapter"), self.settings)
        self.adapter_actions.sig_spectra_loaded.connect(self._on_spectra_requested)
        self.adapter_actions.sig_adapter_changed.connect(self.playground.set_adapter)
        view_menu = self.menuBar().addMenu("&View")
        view_menu.addAction(self.tree_dock.toggleViewAction())
        view_menu.addAction(self.adapter_dock.toggleViewAction())
        help_menu = self.menuBar().addMenu("&Help")
        self._action(help_menu, "&About LoRA Studio", self._on_about_triggered)
        copy = self._action(help_menu, "&Copy versions and device", self._on_copy_versions_triggered)
        copy.setToolTip("For a bug report: the studio's and its libraries' versions, the system and the device")
        if self._log_path is not None:
            self._action(help_menu, "Open the &log file's folder", self._on_open_log_folder_triggered)

    def _connect_file_menu(self) -> None:
        """What the File menu asks for, done by the panels that do it."""
        menu = self.file_menu
        menu.sig_open_model_requested.connect(self.open_model)
        menu.sig_choose_data_requested.connect(self._on_choose_data_requested)
        menu.sig_open_data_requested.connect(self._on_open_data_requested)
        menu.sig_open_run_requested.connect(self.open_run)
        menu.sig_save_config_requested.connect(self._on_save_config_requested)
        menu.sig_quit_requested.connect(self.close)
        self.data_panel.sig_analysed.connect(menu.remember_data)

    @Slot()
    def _on_choose_data_requested(self) -> None:
        self.show_panel(self.data_panel)
        self.data_panel.choose_file()

    @Slot(str)
    def _on_open_data_requested(self, path: str) -> None:
        self.show_panel(self.data_panel)
        self.data_panel.open_file(path)

    @Slot()
    def _on_save_config_requested(self) -> None:
        self.show_panel(self.train_panel)  # where a reason it cannot be saved yet shows
        self.train_panel.save_config()

    @Slot(str)
    def open_run(self, folder: str) -> None:
        """Show `folder` selected in the Runs tab once it is read, or a one-line dialog saying why it cannot be."""
        try:
            self.runs_panel.open_run(folder)
        except StudioError as exc:
            self._on_run_open_failed(str(exc))

    @Slot(str)
    def _on_run_opened(self, folder: str) -> None:
        self.file_menu.remember_run(folder)
        self.show_panel(self.runs_panel)

    @Slot(str)
    def _on_run_open_failed(self, why: str) -> None:
        self.show_error("Cannot open the run", why)

    @Slot()
    def _on_batch_changed(self) -> None:
        form = self.train_panel.form
        self.data_panel.set_batch(form.batch_size.value(), form.gradient_accumulation.value())

    @Slot()
    def _on_gpus_changed(self) -> None:
        form = self.train_panel.form
        self.adapter_panel.set_memory_settings(gpus=form.processes(), sharded=form.sharded())

    @Slot(object)
    def _on_data_analysed(self, analysis: object) -> None:
        prepared = getattr(analysis, "prepared", None)
        if prepared is not None:
            self.train_panel.form.set_train_examples(len(prepared.train))

    def _connect_panels(self) -> None:
        """The panels share the run's shape: one max length, batch size and checkpointing setting, whichever
        panel the user changes it in; the run's events reach the spectrum panel; a finished run's adapter is
        what the Adapter menu works on."""
        form, memory = self.train_panel.form, self.adapter_panel
        form.max_length.valueChanged.connect(self.data_panel.set_max_length)
        form.max_length.valueChanged.connect(memory.seq_spin.setValue)
        form.batch_size.valueChanged.connect(memory.batch_spin.setValue)
        memory.batch_spin.valueChanged.connect(form.batch_size.setValue)
        form.gradient_checkpointing.toggled.connect(memory.checkpointing_check.setChecked)
        memory.checkpointing_check.toggled.connect(form.gradient_checkpointing.setChecked)
        memory.qlora_check.toggled.connect(self.train_panel.set_qlora)
        form.gpus.valueChanged.connect(self._on_gpus_changed)  # the estimate is then each GPU's, sharded or not
        form.shard.toggled.connect(self._on_gpus_changed)
        # an epoch in steps needs the data's example count and the batch: the form and the data tab tell each other
        for spin in (form.batch_size, form.gradient_accumulation):
            spin.valueChanged.connect(self._on_batch_changed)
        self.data_panel.sig_analysed.connect(self._on_data_analysed)
        self.data_panel.set_max_length(form.max_length.value())
        memory.seq_spin.setValue(form.max_length.value())
        memory.batch_spin.setValue(form.batch_size.value())
        self._on_batch_changed()
        session = self.train_panel.session
        session.sig_event.connect(self.spectrum_panel.on_training_event)
        session.sig_finished.connect(self._on_training_finished)
        self.runs_panel.sig_run_opened.connect(self._on_run_opened)
        self.runs_panel.sig_run_open_failed.connect(self._on_run_open_failed)
        self.runs_panel.sig_resume_requested.connect(self._on_resume_requested)
        self.runs_panel.sig_spectra_requested.connect(self._on_spectra_requested)
        self.runs_panel.sig_export_requested.connect(self.adapter_actions.export_run)
        self.runs_panel.sig_merge_requested.connect(self.adapter_actions.merge_run)
        self.adapter_actions.sig_busy_changed.connect(self.runs_panel.set_actions_busy)

    @Slot(str)
    def _on_resume_requested(self, run_dir: str) -> None:
        self.show_panel(self.train_panel)
        self.train_panel.continue_run(run_dir)

    @Slot(object, str)
    def _on_spectra_requested(self, spectra: tuple[ModuleSpectrum, ...], source: str) -> None:
        self.spectrum_panel.show_spectra(spectra, source)
        self.show_panel(self.spectrum_panel)

    @Slot(object)
    def _on_training_finished(self, result: Finished | Failed) -> None:
        if self.opened is not None:
            self.adapter_actions.set_run_result(result, self.opened.spec, self.opened.loaded.task)
        if self._close_after_stop:
            self.close()

    def _action(self, menu: QMenu, text: str, slot: Callable[[], object]) -> QAction:
        action = menu.addAction(text)
        action.triggered.connect(slot)
        return action

    # ---- opening a model ----------------------------------------------------------------------------------

    def is_loading(self) -> bool:
        return self._load_job is not None

    def open_model(self, spec: str) -> BackgroundJob | None:
        """Open `spec` on a worker thread; the window stays live and shows the progress. None while busy."""
        if self._load_job is not None:
            self.statusBar().showMessage("Still opening the previous model", 3000)
            return None
        job = BackgroundJob(lambda report: self._loader(spec, report), name="model-loader")
        job.worker.sig_progress.connect(self._on_loader_progress)
        job.worker.sig_result.connect(self._on_loader_result)
        job.worker.sig_failed.connect(self._on_loader_failed)
        job.worker.sig_finished.connect(self._on_loader_finished)
        self._load_job = job
        self._load_started = time.perf_counter()
        for action in self.open_actions:
            action.setEnabled(False)
        self.progress_bar.setValue(0)
        self.progress_bar.show()
        self.status_label.setText(f"Opening {spec}…")
        job.start()
        return job

    @Slot(object)
    def _on_loader_progress(self, progress: Progress) -> None:
        self.progress_bar.setValue(int(1000 * progress.fraction))
        self.status_label.setText(progress.message)

    @Slot(object)
    def _on_loader_result(self, opened: OpenedModel) -> None:
        self.show_model(opened, time.perf_counter() - self._load_started)

    def show_model(self, opened: OpenedModel, seconds: float | None = None) -> None:
        """Put an opened model into every panel (the loader's result; tests hand one in directly)."""
        self.opened = opened
        tree = opened.tree
        self.plan_state.set_tree(tree, opened.presets.get(FIRST_PRESET, ()))
        self.tree_panel.set_presets(dict(opened.presets))
        self.adapter_panel.set_machine(opened.machine)
        self.summary.show_model(opened)
        self.data_panel.set_tokenizer(opened.loaded.tokenizer)
        self.train_panel.set_model(opened)
        self.playground.set_model(opened.loaded)
        name = opened.loaded.display_name
        self.setWindowTitle(f"LoRA Studio — {name}" + (" (plan mode)" if opened.plan_only else ""))
        self.plan_banner.setText(
            f"<b>Plan mode</b>: {name} was opened from its configuration only, without weights. The module "
            "tree, the counts and the memory estimate are exact; training needs the weights (open the model "
            "folder, a .gguf file or a hub id)."
        )
        self.plan_banner.setVisible(opened.plan_only)
        took = f" (opened in {seconds:.1f} s)" if seconds is not None else ""
        self.status_label.setText(
            f"{name}: {len(tree.modules) - 1:,} modules, {human_count(tree.total_params)} parameters{took}"
        )
        self.file_menu.recent_models.remember(opened.spec)
        self.sig_model_opened.emit(opened)

    @Slot(object)
    def _on_loader_failed(self, failure: WorkFailed) -> None:
        if failure.user_error:
            text = failure.message
        else:
            log.error("opening a model failed:\n%s", failure.details)
            where = f" (details in {self._log_path})" if self._log_path else ""
            text = f"Unexpected error while opening the model: {failure.message}{where}"
        self.status_label.setText("Could not open the model")
        self.show_error("Cannot open the model", text)
        self.sig_model_failed.emit(failure)

    def show_error(self, title: str, text: str) -> None:
        self.error_dialog = QMessageBox(QMessageBox.Warning, title, text, parent=self)
        self.error_dialog.open()  # window-modal without blocking the event loop

    @Slot()
    def _on_loader_finished(self) -> None:
        self._load_job = None
        self.progress_bar.hide()
        for action in self.open_actions:
            action.setEnabled(True)

    # ---- menus --------------------------------------------------------------------------------------------

    def recent_models(self) -> list[str]:
        return self.file_menu.recent_models.entries()

    def versions(self) -> list[str]:
        """The studio's and its libraries' versions ("name 1.2.3"), as About and a bug report show them."""
        from studio import __version__

        versions = [f"LoRA Studio {__version__}"]
        for package in VERSIONED:
            try:
                versions.append(f"{package.replace('-Essentials', '')} {metadata.version(package)}")
            except metadata.PackageNotFoundError:
                continue
        return versions

    def device_text(self) -> str:
        return self.opened.machine.description if self.opened else "not checked yet (no model open)"

    def about_text(self) -> str:
        title, *libraries = self.versions()
        return (
            f"<h3>{title}</h3><p>Fine-tune language models with LoRA and watch what happens "
            f"while it happens.</p><p>{'<br>'.join(libraries)}</p><p>Training device: {self.device_text()}</p>"
        )

    def bug_report_text(self) -> str:
        """What Help ▸ Copy versions and device puts on the clipboard: plain lines to paste into an issue."""
        system = f"Python {platform.python_version()} on {platform.platform()}"
        return "\n".join([*self.versions(), system, f"Training device: {self.device_text()}"]) + "\n"

    @Slot()
    def _on_about_triggered(self) -> None:
        QMessageBox.about(self, "About LoRA Studio", self.about_text())

    @Slot()
    def _on_copy_versions_triggered(self) -> None:
        QGuiApplication.clipboard().setText(self.bug_report_text())
        self.statusBar().showMessage("Versions and device copied to the clipboard", 4000)

    @Slot()
    def _on_open_log_folder_triggered(self) -> None:
        folder = self._log_path.parent  # type: ignore[union-attr] - the entry exists only with a log path
        if not QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder))):
            self.statusBar().showMessage(f"Could not open {folder}: the log is {self._log_path}", 8000)

    # ---- settings -----------------------------------------------------------------------------------------

    def _restore_settings(self) -> None:
        geometry = self.settings.value("window/geometry")
        state = self.settings.value("window/state")
        if geometry is not None:
            self.restoreGeometry(geometry)
        if state is not None:
            self.restoreState(state)

    def save_settings(self) -> None:
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.settings.setValue("window/state", self.saveState())
        self.settings.sync()

    def _confirm_stop_training(self) -> bool:
        self.close_question = QMessageBox(
            QMessageBox.Question, "Training is running",
            "Stop the run and close? The run saves a checkpoint and its adapter first; Resume continues it later.",
            QMessageBox.Yes | QMessageBox.No, self)
        self.close_question.setDefaultButton(QMessageBox.No)
        answer = self.close_question.exec()
        self.close_question = None
        return answer == QMessageBox.Yes

    def closeEvent(self, event: QCloseEvent) -> None:
        session = self.train_panel.session
        if session.is_active():
            # the loop ends after its current step; the window closes once the run has saved its checkpoint
            if self._close_after_stop or self._confirm_stop_training():
                self._close_after_stop = True
                session.stop()
                self.status_label.setText("Stopping the run: saving a checkpoint, then closing…")
            event.ignore()
            return
        self.save_settings()
        if self._load_job is not None:  # loading cannot be interrupted: let it end before Qt tears down
            self.hide()
            self._load_job.wait()
        super().closeEvent(event)
