"""Screenshots of the window as a user sees it. Set STUDIO_SCREENSHOTS=1 to refresh docs/screenshots/;
otherwise they go to the test's temporary folder and only their content is checked."""

from __future__ import annotations

import os
from pathlib import Path

from PySide6.QtGui import QImage

from studio.ui.main_window import MainWindow

DOCS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
SIZE = (1440, 900)


def target(tmp_path: Path, name: str) -> Path:
    return (DOCS if os.environ.get("STUDIO_SCREENSHOTS") else tmp_path) / name


def distinct_colours(path: Path) -> int:
    image = QImage(str(path))
    step = 7
    return len({image.pixel(x, y) for x in range(0, image.width(), step) for y in range(0, image.height(), step)})


def test_screenshot_default_model_with_all_linear(qtbot, window, tmp_path):
    window.resize(*SIZE)
    window.tree_panel.preset_action("all-linear").trigger()
    for name in ("model.layers", "model.layers.0", "model.layers.0.self_attn", "model.layers.0.mlp"):
        window.tree_panel.view.expand(window.tree_panel.source_index(name))
    qtbot.wait(50)  # let the layout settle before grabbing
    path = target(tmp_path, "main-window-default-all-linear.png")
    assert window.grab().save(str(path))
    assert QImage(str(path)).size().toTuple() == SIZE
    assert distinct_colours(path) > 20  # a drawn window, not a blank one


def test_screenshot_plan_mode_70b(qtbot, settings, llama_70b_config, tmp_path):
    window = MainWindow(settings)
    qtbot.addWidget(window)
    window.resize(*SIZE)
    window.show()
    with qtbot.waitSignal(window.sig_model_opened, timeout=120_000):
        window.open_model(str(llama_70b_config))
    window.tree_panel.preset_action("attention").trigger()
    qtbot.keyClicks(window.tree_panel.filter_box, "model.layers.7*.self_attn.*")
    qtbot.wait(50)
    path = target(tmp_path, "plan-mode-llama-70b.png")
    assert window.grab().save(str(path))
    assert distinct_colours(path) > 20
