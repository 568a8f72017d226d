"""The window's File menu: open a model (folder, .gguf, config only, hub id, built-in), a dataset or a run
folder; reopen recent models, datasets and runs; save the run config; quit.

Each kind of dialog starts in the folder that kind last used, and the recent lists (most recent first, at
most MAX_RECENT) live in the window's QSettings, so a new window shows them. An entry whose file or folder has
gone since is shown disabled rather than failing when clicked.

The menu knows no panel: it asks for things through its `sig_*_requested` signals, which the main window wires
to its panels in one place (as it does the Adapter menu's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from PySide6.QtCore import QObject, QSettings, Signal, Slot
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QFileDialog, QInputDialog, QMenu, QWidget

from studio.core.data.dataset import DEMO_DIR
from studio.core.run_layout import is_run_folder
from studio.ui.data_jobs import DataAnalysis

MAX_RECENT = 8


class RecentList:
    """Model specs or paths under one settings key, most recent first, without repeats."""

    def __init__(self, settings: QSettings, key: str) -> None:
        self._settings = settings
        self.key = key

    def entries(self) -> list[str]:
        value = self._settings.value(self.key, [])
        return [value] if isinstance(value, str) else [str(v) for v in (value or [])]

    def remember(self, entry: str) -> None:
        recent = [entry] + [e for e in self.entries() if e != entry]
        self._settings.setValue(self.key, recent[:MAX_RECENT])

    def clear(self) -> None:
        self._settings.remove(self.key)


def model_is_there(spec: str) -> bool:
    """A local path must still exist; "default" and hub ids (org/name) are not checked here."""
    path = Path(spec).expanduser()
    return not (path.is_absolute() or spec.startswith(("~", "."))) or path.exists()


def run_is_there(folder: str) -> bool:
    return is_run_folder(folder)


class FileMenu(QObject):
    sig_open_model_requested = Signal(str)  # a model spec, anything open_model accepts
    sig_choose_data_requested = Signal()  # ask for a data file (the Data tab's own dialog)
    sig_open_data_requested = Signal(str)  # a data file
    sig_open_run_requested = Signal(str)  # a run folder, to show selected in the Runs tab
    sig_save_config_requested = Signal()  # write the Train tab's run.yaml
    sig_quit_requested = Signal()

    def __init__(self, parent: QWidget, menu: QMenu, settings: QSettings, runs_folder: Callable[[], Path]) -> None:
        """`parent`: the dialogs' parent; `runs_folder`: where Open run… starts the first time."""
        super().__init__(parent)
        self._settings = settings
        self._runs_folder = runs_folder
        self.recent_models = RecentList(settings, "models/recent")
        self.recent_data = RecentList(settings, "data/recent")
        self.recent_runs = RecentList(settings, "runs/recent")
        self.open_actions = [  # disabled while a model opens
            self._action(menu, "Open model &folder…", self._on_open_folder_triggered, QKeySequence.Open),
            self._action(menu, "Open .&gguf file…", self._on_open_gguf_triggered),
            self._action(menu, "Open &config only (plan mode)…", self._on_open_config_triggered),
            self._action(menu, "Open &hub id…", self._on_open_hub_triggered),
            self._action(menu, "Open the &built-in model", lambda: self.sig_open_model_requested.emit("default")),
        ]
        menu.addSeparator()
        self.open_data_action = self._action(menu, "Open &dataset…", self.sig_choose_data_requested.emit)
        self.open_data_action.setToolTip("Train on a data file (same as Open… in the Data tab)")
        self.open_run_action = self._action(menu, "Open r&un…", self._on_open_run_triggered)
        self.open_run_action.setToolTip("Show a run folder (the one holding run.yaml) in the Runs tab")
        self.recent_menu = menu.addMenu("Open &recent")
        self.recent_menu.aboutToShow.connect(self.fill_recent_menu)
        menu.addSeparator()
        self.save_config_action = self._action(menu, "&Save run config…", self.sig_save_config_requested.emit,
                                               QKeySequence.Save)
        self.save_config_action.setToolTip("Write run.yaml for `lora-studio train` (Train tab)")
        menu.addSeparator()
        self._action(menu, "&Quit", self.sig_quit_requested.emit, QKeySequence.Quit)

    @property
    def _dialog_parent(self) -> QWidget:
        """Through Qt's parent link: a Python reference would make a cycle with the window."""
        return self.parent()  # type: ignore[return-value]

    def _action(self, menu: QMenu, text: str, slot: Callable[[], object],
                shortcut: QKeySequence.StandardKey | None = None) -> QAction:
        action = menu.addAction(text)
        action.triggered.connect(slot)
        if shortcut is not None:
            action.setShortcut(shortcut)
        return action

    # ---- models -------------------------------------------------------------------------------------------

    def _last_folder(self, kind: str) -> str:
        return str(self._settings.value(f"paths/{kind}", str(Path.home())))

    def _remember_folder(self, kind: str, path: str) -> None:
        self._settings.setValue(f"paths/{kind}", str(Path(path).parent if Path(path).is_file() else path))

    def _open_model_path(self, path: str) -> None:
        if path:
            self._remember_folder("last_folder", path)
            self.sig_open_model_requested.emit(path)

    @Slot()
    def _on_open_folder_triggered(self) -> None:
        self._open_model_path(QFileDialog.getExistingDirectory(
            self._dialog_parent, "Open a model folder", self._last_folder("last_folder")))

    @Slot()
    def _on_open_gguf_triggered(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self._dialog_parent, "Open a .gguf model",
                                              self._last_folder("last_folder"), "GGUF (*.gguf)")
        self._open_model_path(path)

    @Slot()
    def _on_open_config_triggered(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self._dialog_parent, "Open a config.json (plan mode: no weights)",
                                              self._last_folder("last_folder"), "Model config (*.json)")
        self._open_model_path(path)

    @Slot()
    def _on_open_hub_triggered(self) -> None:
        hub_id, ok = QInputDialog.getText(self._dialog_parent, "Open a hub model",
                                          "Hugging Face model id (org/name):")
        if ok and hub_id.strip():
            self.sig_open_model_requested.emit(hub_id.strip())

    # ---- datasets and runs --------------------------------------------------------------------------------

    @Slot(object)
    def remember_data(self, analysis: DataAnalysis) -> None:
        """A file that could be read joins the recent datasets (the built-in demo has its own button)."""
        path = Path(analysis.spec.train_path)
        if analysis.table is not None and path.parent != DEMO_DIR:
            self.recent_data.remember(str(path))

    @Slot()
    def _on_open_run_triggered(self) -> None:
        start = self._last_folder("open_run") if self._settings.contains("paths/open_run") else str(
            self._runs_folder())
        folder = QFileDialog.getExistingDirectory(self._dialog_parent, "Open a run folder (the one holding run.yaml)",
                                                  start)
        if folder:
            self._settings.setValue("paths/open_run", str(Path(folder).parent))
            self.sig_open_run_requested.emit(folder)

    def remember_run(self, folder: str) -> None:
        """A run folder that opened joins the recent runs."""
        self.recent_runs.remember(str(Path(folder).expanduser().resolve()))

    # ---- recent -------------------------------------------------------------------------------------------

    @Slot()
    def fill_recent_menu(self) -> None:
        """Sections for models, datasets and runs; entries that are gone since are shown disabled."""
        menu = self.recent_menu
        menu.clear()
        sections = ((self.recent_models, "Models", model_is_there, self.sig_open_model_requested),
                    (self.recent_data, "Datasets", lambda p: Path(p).exists(), self.sig_open_data_requested),
                    (self.recent_runs, "Runs", run_is_there, self.sig_open_run_requested))
        any_entry = False
        for recent, title, is_there, request in sections:
            entries = recent.entries()
            if not entries:
                continue
            menu.addSection(title)
            for entry in entries:
                there = is_there(entry)
                action = menu.addAction(entry if there else f"{entry} (gone)")
                action.setEnabled(there)
                action.triggered.connect(lambda _=False, e=entry, r=request: r.emit(e))
                any_entry = True
        if not any_entry:
            menu.addAction("(none yet)").setEnabled(False)
            return
        menu.addSeparator()
        menu.addAction("Clear the recent lists", self._on_clear_recent_triggered)

    @Slot()
    def _on_clear_recent_triggered(self) -> None:
        for recent in (self.recent_models, self.recent_data, self.recent_runs):
            recent.clear()
