"""The main window with real loading on its worker thread: responsiveness, plan mode, errors, settings."""

from __future__ import annotations

import logging
import time

import pytest
from PySide6.QtCore import QTimer

from studio.core.model.plan import count
from studio.core.progress import Progress
from studio.ui.main_window import MainWindow

HEARTBEAT_MS = 10
WORST_GAP_LIMIT_S = 0.35  # measured 0.10-0.22 s on this 2-core box while others ran tests; margin for busy CI


def test_loading_the_default_model_keeps_the_ui_thread_responsive(qtbot, settings, default_model):
    window = MainWindow(settings)
    qtbot.addWidget(window)
    window.show()
    beats: list[float] = []
    heartbeat = QTimer()
    heartbeat.timeout.connect(lambda: beats.append(time.perf_counter()))
    heartbeat.start(HEARTBEAT_MS)
    stages: list[str] = []

    with qtbot.waitSignal(window.sig_model_opened, timeout=180_000) as opened:
        job = window.open_model("default")
        job.worker.sig_progress.connect(lambda p: stages.append(p.stage))
        assert window.progress_bar.isVisible() and window.is_loading()
    heartbeat.stop()

    gaps = [b - a for a, b in zip(beats, beats[1:], strict=False)]
    worst = max(gaps)
    print(f"\nUI heartbeat while loading: {len(beats)} beats, worst gap {1000 * worst:.0f} ms")
    assert worst < WORST_GAP_LIMIT_S
    assert {"weights", "inventory", "presets"} <= set(stages)
    qtbot.waitUntil(lambda: not window.is_loading(), timeout=5000)
    assert not window.progress_bar.isVisible()
    result = opened.args[0]
    assert result.loaded.display_name == "SmolLM2-135M-Instruct" and not result.plan_only
    assert window.tree_panel.model.rowCount() == 2  # model, lm_head
    assert window.plan_state.plan.targets == result.presets["peft-default"]
    assert window.adapter_panel.trainable_label.text() == f"{count(result.tree, window.plan_state.plan).trainable:,}"
    assert window.recent_models() == ["default"]
    assert not window.plan_banner.isVisible()


def test_plan_mode_on_a_70b_config_shows_the_tree_counts_and_banner(qtbot, settings, llama_70b_config):
    window = MainWindow(settings)
    qtbot.addWidget(window)
    window.show()
    with qtbot.waitSignal(window.sig_model_opened, timeout=120_000) as opened:
        window.open_model(str(llama_70b_config))
    result = opened.args[0]
    tree = result.tree

    assert result.plan_only and result.loaded.tokenizer is None
    assert tree.total_params == 70_553_706_496
    assert window.plan_banner.isVisible() and "training needs the weights" in window.plan_banner.text()
    assert window.windowTitle().endswith("(plan mode)")
    assert window.tree_panel.model.rowCount(window.tree_panel.model.index_of("model.layers")) == 80

    started = time.perf_counter()
    window.tree_panel.preset_action("all-linear").trigger()
    took = time.perf_counter() - started
    print(f"\nall-linear on the 70B tree ({len(tree.modules)} modules): {1000 * took:.0f} ms, count shown")
    assert len(window.plan_state.plan.targets) == 560
    assert window.adapter_panel.trainable_label.text() == f"{count(tree, window.plan_state.plan).trainable:,}"
    assert took < 0.25  # ~20-60 ms measured
    assert window.summary.values["Weights"].text().startswith("none: plan mode")


def test_a_bad_model_path_shows_the_one_line_error(qtbot, settings, tmp_path):
    window = MainWindow(settings)
    qtbot.addWidget(window)
    missing = tmp_path / "nowhere" / "model.gguf"
    with qtbot.waitSignal(window.sig_model_failed, timeout=30_000) as failed:
        window.open_model(str(missing))
    failure = failed.args[0]
    assert failure.user_error
    assert failure.message == f"no such file or folder: {missing}"
    assert window.error_dialog is not None and window.error_dialog.text() == failure.message
    assert window.opened is None and window.recent_models() == []


def test_an_unexpected_error_is_logged_with_its_traceback(qtbot, settings, tmp_path, caplog):
    def broken_loader(spec, report):
        report(Progress("resolve", 0.1, f"Opening {spec}"))
        return {}["a bug, not a user error"]

    log_path = tmp_path / "studio.log"
    window = MainWindow(settings, log_path=log_path, loader=broken_loader)
    qtbot.addWidget(window)
    with caplog.at_level(logging.ERROR, logger="studio.ui"):
        with qtbot.waitSignal(window.sig_model_failed, timeout=10_000) as failed:
            window.open_model("default")
    failure = failed.args[0]
    assert not failure.user_error and failure.message == "KeyError: 'a bug, not a user error'"
    assert window.error_dialog.text() == (
        f"Unexpected error while opening the model: KeyError: 'a bug, not a user error' (details in {log_path})"
    )
    assert "Traceback (most recent call last)" in caplog.text and "broken_loader" in caplog.text


def test_window_layout_and_recent_models_persist(qtbot, settings, opened_default):
    first = MainWindow(settings)
    qtbot.addWidget(first)
    first.show()
    first.show_model(opened_default)
    first.file_menu.recent_models.remember("default")
    first.file_menu.recent_models.remember("/models/other")
    first.resize(760, 680)  # narrower than the offscreen screen (800 px), which restoreGeometry clamps to
    first.close()

    second = MainWindow(settings)
    qtbot.addWidget(second)
    assert second.recent_models() == ["/models/other", "default"]
    assert (second.width(), second.height()) == (760, 680)
    assert second.tree_dock.objectName() == "modules-dock"


def test_about_names_the_library_versions_and_device(window):
    import peft
    import torch
    import transformers

    text = window.about_text()
    for name, module in (("torch", torch), ("transformers", transformers), ("peft", peft)):
        assert f"{name} {module.__version__}" in text
    assert "PySide6 6." in text
    assert "CPU only" in text or "GiB" in text


@pytest.mark.parametrize("title", ["Modules", "Adapter"])
def test_docks_are_movable(window, title):
    dock = window.tree_dock if title == "Modules" else window.adapter_dock
    assert dock.windowTitle() == title
    assert dock.features() & dock.DockWidgetFeature.DockWidgetMovable
