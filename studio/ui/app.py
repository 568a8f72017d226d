"""Start the studio window: check that Qt can open one here, send the log (ours and the libraries') to a file,
open the model off the UI thread and run the event loop."""

from __future__ import annotations

import os
import sys
from typing import Sequence

EXIT_NO_DISPLAY = 2


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

    from studio.core.logs import send_library_output_to_log
    from studio.core.resources import APP_NAME, app_icon_path
    from studio.ui.main_window import APPLICATION, ORGANIZATION, MainWindow
    from studio.ui.worker import BackgroundJob

    app = QApplication.instance() or QApplication(list(argv) if argv is not None else sys.argv[:1])
    app.setOrganizationName(ORGANIZATION)
    app.setApplicationName(APPLICATION)
    app.setApplicationDisplayName("LoRA Studio")
    app.setWindowIcon(QIcon(str(app_icon_path())))
    app.setDesktopFileName(APP_NAME)  # Wayland shows the icon named by the installed lora-studio.desktop
    window = MainWindow(QSettings(ORGANIZATION, APPLICATION), log_path=send_library_output_to_log())
    window.show()
    window.open_model(model_spec)
    code = app.exec()
    BackgroundJob.wait_all()
    return int(code)
