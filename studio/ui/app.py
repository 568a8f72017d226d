"""Start the studio window: check that Qt can open one here, set up the log file, open the model off the UI
thread and run the event loop."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Sequence

EXIT_NO_DISPLAY = 2
LOG_NAME = "studio.log"


def state_dir() -> Path:
    """Where the studio writes its log: $XDG_STATE_HOME/lora-studio, else ~/.local/state/lora-studio."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "lora-studio"


def _log_to_file() -> Path | None:
    """Unexpected errors go to a log file with their traceback; the dialog only names the file."""
    path = state_dir() / LOG_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:
        return None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("studio").addHandler(handler)
    logging.getLogger("studio").setLevel(logging.INFO)
    return path


def run_gui(model_spec: str = "default", argv: Sequence[str] | None = None) -> int:
    """Open the studio window on `model_spec` and return the application's exit code (2: no usable display)."""
    from studio.ui.display import display_problem

    problem = display_problem(os.environ)
    if problem:
        print(problem, file=sys.stderr)
        return EXIT_NO_DISPLAY

    from PySide6.QtCore import QSettings
    from PySide6.QtGui import QIcon
    from PySide6.QtWidgets import QApplication

    from studio.core.resources import APP_NAME, app_icon_path
    from studio.ui.main_window import APPLICATION, ORGANIZATION, MainWindow
    from studio.ui.worker import BackgroundJob

    app = QApplication.instance() or QApplication(list(argv) if argv is not None else sys.argv[:1])
    app.setOrganizationName(ORGANIZATION)
    app.setApplicationName(APPLICATION)
    app.setApplicationDisplayName("LoRA Studio")
    app.setWindowIcon(QIcon(str(app_icon_path())))
    app.setDesktopFileName(APP_NAME)  # Wayland shows the icon named by the installed lora-studio.desktop
    window = MainWindow(QSettings(ORGANIZATION, APPLICATION), log_path=_log_to_file())
    window.show()
    window.open_model(model_spec)
    code = app.exec()
    BackgroundJob.wait_all()
    return int(code)
