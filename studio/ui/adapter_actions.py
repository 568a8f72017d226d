"""The Adapter menu: export the run's adapter, merge it into its base and save the result, export the merge as
one GGUF file for llama.cpp and Ollama, load a saved adapter to inspect its spectra. Each runs off the UI thread
and ends with a message naming what it wrote.

"The adapter" is the one the window last had in hand: the run that just ended, or a folder loaded here. The
Runs panel exports or merges the run selected there instead (`export_run`, `merge_run`), its base and task
read from its run.yaml. Nothing a person had is replaced (core/files.py): a chosen folder holding a person's
files gets the result in a new folder inside it; an earlier export or merge of the studio's, or an existing
GGUF file, is replaced only once the person says so in a question.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PySide6.QtCore import QObject, QSettings, Qt, Signal, Slot
from PySide6.QtWidgets import QFileDialog, QMenu, QMessageBox, QProgressDialog, QWidget

from studio.core import events as ev
from studio.core.adapters.folder import AdapterInfo, run_adapter
from studio.core.adapters.merging import MergeReport
from studio.core.events import ModuleSpectrum
from studio.core.files import foreign_entries, studio_wrote
from studio.core.progress import Progress, scaled
from studio.core.train.run_folder import RunSummary
from studio.ui.worker import BackgroundJob, Report, WorkFailed

# one save dialog picks both the file and its weight type, through the file-type filter
GGUF_FILTERS = {
    "GGUF, 16-bit float: nearly exact (*.gguf)": "f16",
    "GGUF, 8-bit q8_0: half the size of f16 (*.gguf)": "q8_0",
    "GGUF, bfloat16 (*.gguf)": "bf16",
    "GGUF, 32-bit float: exact, largest (*.gguf)": "f32",
}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurrentAdapter:
    """An adapter folder, the base model it belongs to (what open_model accepts) and the run it came from."""

    folder: Path
    base_spec: str | None
    run_dir: Path | None = None
    task: str = "causal-lm"


@dataclass(frozen=True)
class LoadedAdapter:
    info: AdapterInfo
    spectra: tuple[ModuleSpectrum, ...]


def free_target(chosen: Path, name: str) -> Path:
    """`chosen` itself when it holds none of a person's files (new, empty, or the studio's earlier output), else a
    new folder `name` (or `name-2`, ...) inside it."""
    try:
        if not foreign_entries(chosen):
            return chosen
    except OSError:  # unreadable: the job says why in one line
        return chosen
    target, suffix = chosen / name, 1
    while target.exists():
        suffix += 1
        target = chosen / f"{name}-{suffix}"
    return target


def adapter_of_run(run: RunSummary) -> CurrentAdapter | None:
    """A run folder's adapter with the base and task its run.yaml names; None before it saved one."""
    folder = run.adapter
    return CurrentAdapter(folder, run.model, run.folder, run.task) if folder is not None else None


def _base_of(adapter: CurrentAdapter) -> str:
    if not adapter.base_spec:
        from studio.core.errors import ExportError

        raise ExportError(f"{adapter.folder} does not name its base model: open the base and merge from a run")
    return adapter.base_spec


def merge_job(adapter: CurrentAdapter, target: Path) -> Callable[[Report], MergeReport]:
    def job(report: Report) -> MergeReport:
        from studio.core.adapters.loading import load_adapter
        from studio.core.adapters.merging import merge_and_save
        from studio.core.model.loading import open_model
        from studio.ui.model_loader import import_libraries

        import_libraries()
        # opening the base is the first 30% of the dialog's bar, the merge the rest
        loaded = open_model(_base_of(adapter), task=adapter.task,  # type: ignore[arg-type]
                            on_progress=scaled(report, 0.0, 0.3, stage="open"))
        peft_model = load_adapter(loaded, adapter.folder)
        dtype = loaded.dtype if loaded.dtype in ("float32", "bfloat16", "float16") else "float32"
        return merge_and_save(peft_model, loaded.tokenizer, target, dtype=dtype,  # type: ignore[arg-type]
                              on_progress=scaled(report, 0.3, 1.0))

    return job


def gguf_job(adapter: CurrentAdapter, target: Path, out_type: str, force: bool = False) -> Callable[[Report], Any]:
    def job(report: Report) -> Any:
        from studio.core.gguf.export import export_adapter_gguf
        from studio.ui.model_loader import import_libraries

        import_libraries()
        return export_adapter_gguf(adapter.folder, _base_of(adapter), target, out_type,  # type: ignore[arg-type]
                                   on_progress=report, force=force)

    return job


def load_job(folder: Path) -> Callable[[Report], LoadedAdapter]:
    def job(_report: Report) -> LoadedAdapter:
        from studio.core.adapters.folder import read_adapter_info
        from studio.core.adapters.spectrum import read_adapter_spectra

        return LoadedAdapter(read_adapter_info(folder), read_adapter_spectra(folder))

    return job


def export_job(run_dir: Path, target: Path) -> Callable[[Report], Path]:
    def job(_report: Report) -> Path:
        from studio.core.adapters.saving import export_run_adapter

        return export_run_adapter(run_dir, target)

    return job


class AdapterActions(QObject):
    sig_message = Signal(str)  # the closing message of an action (also shown in a message box)
    sig_spectra_loaded = Signal(object, str)  # after Load adapter…: its spectra and where they come from
    sig_adapter_changed = Signal(object)  # Path: the folder of the adapter these actions now work on
    sig_busy_changed = Signal(bool)  # an export, merge or load started (True) or ended (False)

    def __init__(self, window: QWidget, menu: QMenu, settings: QSettings) -> None:
        super().__init__(window)
        self._settings = settings
        self.adapter: CurrentAdapter | None = None
        self.message_box: QMessageBox | None = None
        self.replace_question: QMessageBox | None = None  # open while asking whether to replace an earlier output
        self._on_replace: Callable[[], None] | None = None  # what Replace starts
        self.progress_dialog: QProgressDialog | None = None
        self._job: BackgroundJob | None = None
        self._loading = Path()  # the folder Load adapter… is reading
        self.export_action = menu.addAction("&Export adapter…")
        self.export_action.setToolTip("Copy the run's adapter (PEFT format) to a folder of your choice")
        self.export_action.triggered.connect(self._on_export_triggered)
        self.merge_action = menu.addAction("&Merge and save…")
        self.merge_action.setToolTip("Fold the adapter into its base and save one plain model folder")
        self.merge_action.triggered.connect(self._on_merge_triggered)
        self.gguf_action = menu.addAction("Export &GGUF for llama.cpp / Ollama…")
        self.gguf_action.setToolTip("Merge the adapter into its base and write one .gguf file (and an Ollama "
                                    "Modelfile), checked in llama.cpp against the merged model")
        self.gguf_action.triggered.connect(self._on_gguf_triggered)
        menu.addSeparator()
        self.load_action = menu.addAction("&Load adapter…")
        self.load_action.setToolTip("Read a saved LoRA adapter and show its singular values")
        self.load_action.triggered.connect(self._on_load_triggered)
        self._update_actions()

    @property
    def _window(self) -> QWidget:
        """The dialogs' parent, through Qt's parent link: a Python reference would make a cycle with the window."""
        return self.parent()  # type: ignore[return-value]

    def is_busy(self) -> bool:
        return self._job is not None

    # ---- what the adapter is -------------------------------------------------------------------------------

    def set_run_result(self, result: ev.Finished | ev.Failed, base_spec: str, task: str = "causal-lm") -> None:
        """The run that just ended (or failed with a checkpoint) becomes the adapter these actions work on."""
        if isinstance(result, ev.Finished):
            run_dir = Path(result.run_dir)
        elif result.checkpoint:
            run_dir = Path(result.checkpoint).parent.parent
        else:
            return
        folder = run_adapter(run_dir)
        if folder is not None:
            self.adapter = CurrentAdapter(folder, base_spec, run_dir, task)
            self.sig_adapter_changed.emit(folder)
        self._update_actions()

    def _update_actions(self) -> None:
        idle = self._job is None
        self.export_action.setEnabled(idle and self.adapter is not None and self.adapter.run_dir is not None)
        self.merge_action.setEnabled(idle and self.adapter is not None)
        self.gguf_action.setEnabled(idle and self.adapter is not None)
        self.load_action.setEnabled(idle)
        self.sig_busy_changed.emit(not idle)

    # ---- the actions ---------------------------------------------------------------------------------------

    def _choose_folder(self, title: str) -> Path | None:
        start = str(self._settings.value("paths/adapters", str(Path.home())))
        folder = QFileDialog.getExistingDirectory(self._window, title, start)
        if not folder:
            return None
        self._settings.setValue("paths/adapters", folder)
        return Path(folder)

    @Slot()
    def _on_export_triggered(self) -> None:
        self._export(self.adapter)

    @Slot()
    def _on_merge_triggered(self) -> None:
        self._merge(self.adapter)

    def export_run(self, run: RunSummary) -> None:
        """Export `run`'s adapter; the adapter the menu works on stays as it is."""
        self._export(adapter_of_run(run))

    def merge_run(self, run: RunSummary) -> None:
        """Merge `run`'s adapter into the base its run.yaml names; the menu's adapter stays as it is."""
        self._merge(adapter_of_run(run))

    def _export(self, adapter: CurrentAdapter | None) -> None:
        if self._job is not None or adapter is None or adapter.run_dir is None:
            return
        chosen = self._choose_folder("Export the adapter to a folder")
        if chosen is None:
            return
        target = free_target(chosen, f"{adapter.run_dir.name}-adapter")
        run_dir = adapter.run_dir
        self._after_asking(target, "adapter", lambda: self._run(export_job(run_dir, target), self._on_exported))

    def _merge(self, adapter: CurrentAdapter | None) -> None:
        if self._job is not None or adapter is None:
            return
        chosen = self._choose_folder("Save the merged model to a folder")
        if chosen is None:
            return
        name = f"{adapter.run_dir.name if adapter.run_dir else adapter.folder.name}-merged"
        target = free_target(chosen, name)

        def start() -> None:
            self._show_progress("Merge and save", f"Merging into {target}…")
            self._run(merge_job(adapter, target), self._on_merged, self._on_merge_progress)

        self._after_asking(target, "merged model", start)

    def _after_asking(self, target: Path, what: str, start: Callable[[], None]) -> None:
        """`start()` now for a new or empty folder; for one holding the studio's earlier output, once the person
        chose Replace (free_target never picks a folder holding a person's files)."""
        try:
            earlier = target.is_dir() and any(target.iterdir())
        except OSError:  # unreadable: the job says why in one line
            earlier = False
        if earlier:
            self._ask_to_replace(f"{target} holds files LoRA Studio wrote earlier. Replace them with the {what}?",
                                 start)
        else:
            start()

    def _ask_to_replace(self, text: str, start: Callable[[], None]) -> None:
        box = QMessageBox(QMessageBox.Question, "Replace?", text, QMessageBox.Yes | QMessageBox.Cancel, self._window)
        box.button(QMessageBox.Yes).setText("Replace")
        box.setDefaultButton(QMessageBox.Cancel)
        box.finished.connect(self._on_replace_answered)
        self.replace_question, self._on_replace = box, start
        box.open()  # window-modal without blocking the event loop

    @Slot(int)
    def _on_replace_answered(self, _result: int) -> None:
        box, start = self.replace_question, self._on_replace
        self.replace_question = self._on_replace = None
        if box is not None and start is not None and box.standardButton(box.clickedButton()) == QMessageBox.Yes:
            start()

    @Slot()
    def _on_gguf_triggered(self) -> None:
        adapter = self.adapter
        if self._job is not None or adapter is None:
            return
        name = adapter.run_dir.name if adapter.run_dir else adapter.folder.name
        start = Path(str(self._settings.value("paths/adapters", str(Path.home())))) / f"{name}.gguf"
        path, chosen_filter = QFileDialog.getSaveFileName(  # the question comes below, once .gguf is added
            self._window, "Export the merged model as GGUF", str(start), ";;".join(GGUF_FILTERS), "",
            QFileDialog.DontConfirmOverwrite)
        if not path:
            return
        self._settings.setValue("paths/adapters", str(Path(path).parent))
        out_type = GGUF_FILTERS.get(chosen_filter, "f16")
        target = Path(path) if path.endswith(".gguf") else Path(f"{path}.gguf")

        def write(force: bool) -> None:
            self._show_progress("Export GGUF", f"Writing {target}…")
            self._run(gguf_job(adapter, target, out_type, force), self._on_gguf_written, self._on_merge_progress)

        if target.exists():
            whose = "an earlier GGUF file written by LoRA Studio" if studio_wrote(target) else \
                "a file LoRA Studio did not write"
            self._ask_to_replace(f"{target} is {whose}. Replace it?", lambda: write(True))
        else:
            write(False)

    def _show_progress(self, title: str, text: str) -> None:
        self.progress_dialog = QProgressDialog(text, "", 0, 1000, self._window)
        self.progress_dialog.setCancelButton(None)  # the job cannot be interrupted half-written
        self.progress_dialog.setWindowTitle(title)
        self.progress_dialog.setWindowModality(Qt.WindowModal)
        self.progress_dialog.setMinimumDuration(0)
        self.progress_dialog.setValue(0)

    @Slot()
    def _on_load_triggered(self) -> None:
        folder = self._choose_folder("Load a LoRA adapter folder")
        if folder is not None:
            self.load(folder)

    def load(self, folder: Path) -> None:
        self._loading = folder
        self._run(load_job(folder), self._on_loaded)

    # ---- jobs ----------------------------------------------------------------------------------------------

    def _run(self, job: Callable[[Report], Any], on_result: Callable[[Any], None],
             on_progress: Callable[[Any], None] | None = None) -> None:
        """`on_result` and `on_progress` must be slots of this object, so that Qt queues them to its thread."""
        self._job = BackgroundJob(job, name="adapter")
        self._job.worker.sig_result.connect(on_result)
        self._job.worker.sig_failed.connect(self._on_job_failed)
        self._job.worker.sig_finished.connect(self._on_job_finished)
        if on_progress is not None:
            self._job.worker.sig_progress.connect(on_progress)
        self._update_actions()
        self._job.start()

    @Slot(object)
    def _on_merge_progress(self, progress: Progress) -> None:
        if self.progress_dialog is not None:
            self.progress_dialog.setLabelText(progress.message)
            self.progress_dialog.setValue(int(1000 * progress.fraction))

    @Slot(object)
    def _on_exported(self, target: Path) -> None:
        self._tell("Adapter exported", f"The adapter was saved to {target}")

    @Slot(object)
    def _on_merged(self, report: MergeReport) -> None:
        notes = "".join(f"\n• {note}" for note in report.notes)
        rounding = (f"; {report.saved_logit_diff:.2e} once saved in {report.dtype}"
                    if report.saved_logit_diff != report.max_logit_diff else "")
        self._tell("Merged model saved",
                   f"The merged model was saved to {report.path} in {report.seconds:.0f} s.\n"
                   f"Max logit difference against base + adapter: {report.max_logit_diff:.2e}{rounding}.{notes}")

    @Slot(object)
    def _on_gguf_written(self, report: Any) -> None:
        size = f"{report.bytes / 2**20:,.1f} MiB"
        if report.verified:
            agreed = round(report.top1_agreement * report.probe_tokens)
            check = (f"llama.cpp ran it: the next token agrees with the merged model on {agreed} of "
                     f"{report.probe_tokens} probe positions (max logit difference {report.max_logit_diff:.2g}).")
        else:
            check = "Not checked in llama.cpp here (llama-cpp-python is not installed)."
        notes = "".join(f"\n• {note}" for note in report.notes)
        self._tell("GGUF file written",
                   f"The GGUF file was saved to {report.path} ({report.out_type}, {size}, {report.seconds:.0f} s).\n"
                   f"{check}\nOllama: in that folder, run `ollama create NAME -f "
                   f"{Path(report.modelfile).name}`.{notes}")

    @Slot(object)
    def _on_loaded(self, loaded: LoadedAdapter) -> None:
        folder, info = self._loading, loaded.info
        self.adapter = CurrentAdapter(folder, info.base_model, None, "seq-cls" if info.task_type == "SEQ_CLS"
                                      else "causal-lm")
        self.sig_adapter_changed.emit(folder)
        self.sig_spectra_loaded.emit(loaded.spectra, f"Adapter {folder}")
        self._tell("Adapter loaded",
                   f"Loaded the adapter in {folder}: {info.variant} r={info.r}, α={info.alpha:g}, "
                   f"{info.modules} modules, {info.parameters:,} parameters; base {info.base_model or 'not named'}.")

    @Slot(object)
    def _on_job_failed(self, failure: WorkFailed) -> None:
        if not failure.user_error:
            log.error("an adapter action failed:\n%s", failure.details)
        self._tell("Adapter action failed", failure.message, QMessageBox.Warning)

    @Slot()
    def _on_job_finished(self) -> None:
        self._job = None
        if self.progress_dialog is not None:
            self.progress_dialog.close()
            self.progress_dialog = None
        self._update_actions()

    def _tell(self, title: str, text: str, icon: QMessageBox.Icon = QMessageBox.Information) -> None:
        self.message_box = QMessageBox(icon, title, text, parent=self._window)
        self.message_box.open()  # window-modal without blocking the event loop
        self.sig_message.emit(text)
