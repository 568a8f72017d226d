"""The File and Help menus and the Runs panel's actions, on two real tiny runs trained from one window: opening
a dataset, a run (also from outside the runs folder) and the recent items, saving the run config, overlaying
two runs' training and validation losses, and exporting or merging the selected run's adapter."""

from __future__ import annotations

import gc
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from PySide6.QtCore import QCoreApplication, QEvent, QObject, QSettings, Qt, QTimer, QUrl, Slot
from PySide6.QtGui import QDesktopServices, QGuiApplication, QKeySequence
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication, QFileDialog, QLineEdit, QMessageBox

from studio.core import events as ev
from studio.core.runconfig import load
from studio.ui.adapter_actions import CurrentAdapter, adapter_of_run
from studio.ui.loss_overlay import SELECTED_WIDTH
from studio.ui.main_window import MainWindow
from studio.ui.runs_panel import NO_ADAPTER
from tests.ui.test_screenshots import SIZE, distinct_colours, target
from tests.ui.tiny_run import configure_tiny_run, wait_until, write_demo_rows


@dataclass
class TwoRuns:
    window: MainWindow
    root: Path
    inside: Path  # a run in the window's runs folder
    outside: Path  # a run in another folder, which File ▸ Open run… brings in
    data_file: Path


def train(window: MainWindow) -> Path:
    """Click Start and run the event loop until the run has ended; its folder."""
    events: list[object] = []
    session = window.train_panel.session
    session.sig_event.connect(events.append)
    window.show_panel(window.train_panel)
    QTest.mouseClick(window.train_panel.start_button, Qt.LeftButton)
    wait_until(lambda: any(isinstance(e, (ev.Finished, ev.Failed)) for e in events) and not session.is_active(),
               300, "the tiny run to finish")
    session.sig_event.disconnect(events.append)
    finished = [e for e in events if isinstance(e, ev.Finished)]
    assert finished, [e for e in events if isinstance(e, ev.Failed)]
    return Path(finished[-1].run_dir)


@pytest.fixture(scope="module")
def runs(qapp, opened_default, tmp_path_factory):
    """Two 3-step runs on 8 demo rows (one validation evaluation mid-run and one at the end), the second with
    another learning rate and in a folder of its own."""
    root = tmp_path_factory.mktemp("two-runs")
    window = MainWindow(QSettings(str(root / "settings.ini"), QSettings.IniFormat))
    window.resize(*SIZE)
    window.show()
    window.show_model(opened_default)
    data_file = write_demo_rows(root / "tiny.jsonl", 8)
    configure_tiny_run(window, data_file, root / "runs", 3, val_fraction=0.25, eval_every=2)
    inside = train(window)
    window.train_panel.form.learning_rate.setValue(5e-4)
    window.train_panel.set_runs_dir(root / "elsewhere")
    outside = train(window)
    window.train_panel.set_runs_dir(root / "runs")
    yield TwoRuns(window, root, inside, outside, data_file)
    window.close()
    window.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)
    gc.collect()  # now, not during a later test that measures the UI (see tiny_run.collect_dead_windows)


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == kind]


def choose_folder(monkeypatch, folder: Path) -> list[str]:
    """Answer the next folder dialogs with `folder`; the folders they started in are collected."""
    started: list[str] = []

    def answer(_parent, _title, start, *args, **kwargs):
        started.append(start)
        return str(folder)

    monkeypatch.setattr(QFileDialog, "getExistingDirectory", staticmethod(answer))
    return started


def listed(panel) -> None:
    """Run the event loop until the Runs panel has read the run folders (it reads them off the UI thread)."""
    wait_until(lambda: not panel.is_listing(), 30, "the runs panel to read the run folders")


def open_run(runs: TwoRuns, monkeypatch, folder: Path) -> list[str]:
    started = choose_folder(monkeypatch, folder)
    runs.window.file_menu.open_run_action.trigger()
    listed(runs.window.runs_panel)
    return started


def drawn(panel, folders: set[str]) -> None:
    wait_until(lambda: set(panel.curves) == folders, 30, "the ticked runs' curves to be read and drawn")


# ---- File ▸ Open run… ---------------------------------------------------------------------------------------

def test_open_run_from_outside_the_runs_folder_lists_it_selected_and_remembers_it(runs, monkeypatch):
    window, panel = runs.window, runs.window.runs_panel
    started = open_run(runs, monkeypatch, runs.outside)
    assert window.current_panel() is panel
    assert {run.folder for run in panel.runs} == {runs.inside, runs.outside}
    assert panel.selected_run().folder == runs.outside
    assert window.file_menu.recent_runs.entries()[0] == str(runs.outside.resolve())
    assert started == [str(runs.root / "runs")]  # the first time: the runs folder
    assert open_run(runs, monkeypatch, runs.outside) == [str(runs.outside.parent)]  # then where the last one was
    assert len(panel.runs) == 2  # opened twice, listed once


def test_open_run_on_a_folder_that_is_not_a_run_says_so_in_one_line(runs, monkeypatch):
    window = runs.window
    before = window.file_menu.recent_runs.entries()
    empty = runs.root / "not-a-run"
    empty.mkdir(exist_ok=True)
    open_run(runs, monkeypatch, empty)
    assert window.error_dialog.isVisible() and window.error_dialog.windowModality() == Qt.WindowModal
    assert window.error_dialog.text() == f"{empty} is not a run folder: it holds no run.yaml"
    window.error_dialog.close()
    broken = runs.root / "broken-run"
    broken.mkdir(exist_ok=True)
    (broken / "run.yaml").write_text("model: [unclosed\n")
    open_run(runs, monkeypatch, broken)
    wait_until(lambda: window.error_dialog.isVisible(), 30, "the broken run.yaml to be read")
    assert window.error_dialog.text() == f"{broken / 'run.yaml'} is not valid YAML at line 2"
    window.error_dialog.close()
    assert window.file_menu.recent_runs.entries() == before
    assert {empty, broken}.isdisjoint(run.folder for run in window.runs_panel.runs)


# ---- the overlay --------------------------------------------------------------------------------------------

def test_two_ticked_runs_show_their_training_and_validation_losses_in_their_own_colours(runs, monkeypatch, qtbot,
                                                                                      tmp_path):
    window, panel = runs.window, runs.window.runs_panel
    open_run(runs, monkeypatch, runs.outside)
    panel.set_ticked([str(runs.inside), str(runs.outside)])
    drawn(panel, {str(runs.inside), str(runs.outside)})
    assert set(panel.curves) == set(panel.val_curves) == {str(runs.inside), str(runs.outside)}
    colours = set()
    for run_dir in (runs.inside, runs.outside):
        steps, evals = records(run_dir, "StepMetrics"), records(run_dir, "EvalMetrics")
        assert [e["step"] for e in evals] == [2, 3]  # eval_every=2, and the final evaluation
        train, val = panel.curves[str(run_dir)], panel.val_curves[str(run_dir)]
        assert train.xData.tolist() == [r["step"] for r in steps] == [1, 2, 3]
        assert train.yData.tolist() == [r["loss"] for r in steps]
        assert val.xData.tolist() == [2, 3] and val.yData.tolist() == [e["val_loss"] for e in evals]
        train_pen, val_pen = train.opts["pen"], val.opts["pen"]
        assert train_pen.color() == val_pen.color() and val_pen.style() == Qt.DashLine
        assert val.opts["symbol"] == "s" and train_pen.style() == Qt.SolidLine
        colours.add(train_pen.color().name())
    assert len(colours) == 2
    assert records(runs.inside, "StepMetrics")[0]["loss"] == records(runs.outside, "StepMetrics")[0]["loss"]
    assert records(runs.inside, "StepMetrics")[-1]["loss"] != records(runs.outside, "StepMetrics")[-1]["loss"]
    assert panel.curves[str(runs.outside)].opts["pen"].widthF() == SELECTED_WIDTH  # the selected run stands out
    assert panel.curves[str(runs.inside)].opts["pen"].widthF() < SELECTED_WIDTH

    qtbot.wait(150)  # the layout settles
    path = target(tmp_path, "runs-panel-two-runs.png")
    assert window.grab().save(str(path))
    assert distinct_colours(path) > 20


def test_double_click_ticks_the_run_and_draws_its_curves_bold(runs, qtbot):
    window, panel = runs.window, runs.window.runs_panel
    window.show_panel(panel)
    listed(panel)
    panel.set_ticked([])
    assert panel.curves == {}
    item = next(panel.table.topLevelItem(i) for i in range(panel.table.topLevelItemCount())
                if panel.table.topLevelItem(i).data(0, Qt.UserRole) == str(runs.inside))
    assert "double-click" in item.toolTip(0)
    where = panel.table.visualItemRect(item).center()
    QTest.mouseClick(panel.table.viewport(), Qt.LeftButton, Qt.NoModifier, where)  # a double-click's first press
    QTest.mouseDClick(panel.table.viewport(), Qt.LeftButton, Qt.NoModifier, where)
    assert panel.ticked_runs() == [str(runs.inside)] and panel.selected_run().folder == runs.inside
    drawn(panel, {str(runs.inside)})
    assert panel.curves[str(runs.inside)].opts["pen"].widthF() == SELECTED_WIDTH


# ---- export and merge from the Runs panel -------------------------------------------------------------------

def test_export_from_the_runs_panel_copies_the_selected_runs_adapter(runs, monkeypatch, qtbot):
    window, panel, actions = runs.window, runs.window.runs_panel, runs.window.adapter_actions
    window.show_panel(panel)
    listed(panel)
    menu_adapter = actions.adapter  # the run that ended last: the outside one
    panel.select_run(runs.inside)
    chosen = runs.root / "exported"
    choose_folder(monkeypatch, chosen)
    assert panel.export_button.isEnabled() and panel.merge_button.isEnabled()
    with qtbot.waitSignal(actions.sig_message, timeout=60_000) as message:
        panel.export_button.click()
        assert not panel.export_button.isEnabled() and not panel.merge_button.isEnabled()  # one job at a time
    assert message.args[0] == f"The adapter was saved to {chosen}"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (chosen / name).read_bytes() == (runs.inside / "adapter" / name).read_bytes()
    assert actions.adapter == menu_adapter and menu_adapter.run_dir == runs.outside
    qtbot.waitUntil(lambda: panel.export_button.isEnabled())


def test_exporting_over_an_earlier_export_asks_first_and_cancel_keeps_it(runs, monkeypatch, qtbot):
    window, panel, actions = runs.window, runs.window.runs_panel, runs.window.adapter_actions
    window.show_panel(panel)
    chosen = runs.root / "asked"
    choose_folder(monkeypatch, chosen)
    panel.select_run(runs.inside)
    with qtbot.waitSignal(actions.sig_message, timeout=60_000):
        panel.export_button.click()
    assert actions.replace_question is None  # a new folder: nothing to ask
    qtbot.waitUntil(lambda: not actions.is_busy())
    weights = "adapter_model.safetensors"
    inside, outside = (run / "adapter" / weights for run in (runs.inside, runs.outside))
    assert (chosen / weights).read_bytes() == inside.read_bytes() != outside.read_bytes()

    panel.select_run(runs.outside)
    for answer in (QMessageBox.Cancel, QMessageBox.Yes):
        panel.export_button.click()
        question = actions.replace_question
        assert question is not None and question.isVisible() and not actions.is_busy()
        assert question.text() == f"{chosen} holds files LoRA Studio wrote earlier. Replace them with the adapter?"
        assert question.button(QMessageBox.Yes).text() == "Replace"
        if answer == QMessageBox.Cancel:
            question.button(answer).click()
            assert actions.replace_question is None and not actions.is_busy()
            assert (chosen / weights).read_bytes() == inside.read_bytes()  # kept
        else:
            with qtbot.waitSignal(actions.sig_message, timeout=60_000) as message:
                question.button(answer).click()
            assert message.args[0] == f"The adapter was saved to {chosen}"
    assert (chosen / weights).read_bytes() == outside.read_bytes()  # replaced once the person said so
    qtbot.waitUntil(lambda: not actions.is_busy())


def test_merge_from_the_runs_panel_opens_the_base_its_run_yaml_names(runs, monkeypatch, qtbot):
    """A copy of a run whose run.yaml names a base that is gone: the merge reads that base (and says it cannot
    open it), not the model open in the window. The merge itself is checked in test_training_run.py."""
    panel, actions = runs.window.runs_panel, runs.window.adapter_actions
    moved = runs.root / "elsewhere" / "moved-base"
    shutil.copytree(runs.inside, moved)
    config = yaml.safe_load((moved / "run.yaml").read_text())
    gone = runs.root / "models" / "deleted-base"
    config["model"]["source"] = str(gone)
    (moved / "run.yaml").write_text(yaml.safe_dump(config))
    open_run(runs, monkeypatch, moved)
    assert panel.selected_run().model == str(gone)
    assert adapter_of_run(panel.selected_run()) == CurrentAdapter(moved / "adapter", str(gone), moved, "causal-lm")
    choose_folder(monkeypatch, runs.root / "merged")
    with qtbot.waitSignal(actions.sig_message, timeout=60_000) as message:
        panel.merge_button.click()
    assert message.args[0] == f"no such file or folder: {gone}"
    assert actions.message_box.windowTitle() == "Adapter action failed"
    assert not (runs.root / "merged").exists()


def test_a_run_without_adapter_or_checkpoint_cannot_be_exported_and_says_why(runs, qtbot):
    window, panel = runs.window, runs.window.runs_panel
    fresh = runs.root / "runs" / "00000000-000000-not-started"
    fresh.mkdir()
    shutil.copy(runs.inside / "run.yaml", fresh / "run.yaml")
    window.show_panel(panel)
    panel.refresh()
    listed(panel)
    panel.select_run(fresh)
    assert panel.selected_run().status == "not started"
    for button in (panel.export_button, panel.merge_button):
        assert not button.isEnabled() and button.toolTip() == NO_ADAPTER
    panel.select_run(runs.inside)
    assert panel.export_button.isEnabled() and "adapter" in panel.export_button.toolTip()
    shutil.rmtree(fresh)


# ---- File ▸ Open dataset…, Save run config… ------------------------------------------------------------------

def choose_in_open_dialog(path: Path, asked: list[str]) -> None:
    """Once the Open dialog is up: note the folder it starts in, choose `path`, accept."""
    def choose() -> None:
        dialog = next((w for w in QApplication.topLevelWidgets() if isinstance(w, QFileDialog) and w.isVisible()),
                      None)
        if dialog is None:
            QTimer.singleShot(50, choose)  # not shown yet
            return
        asked.append(dialog.directory().absolutePath())
        dialog.findChild(QLineEdit, "fileNameEdit").setText(str(path))  # typed, as a person would
        dialog.accept()

    QTimer.singleShot(50, choose)


def test_open_dataset_from_the_menu_shows_the_data_tab_and_joins_the_recent_datasets(runs, qtbot):
    window, data = runs.window, runs.window.data_panel
    (runs.root / "other-data").mkdir()
    other = write_demo_rows(runs.root / "other-data" / "twelve.jsonl", 12)
    asked: list[str] = []
    choose_in_open_dialog(other, asked)
    window.file_menu.open_data_action.trigger()
    assert window.current_panel() is data and data.path_edit.text() == str(other)
    qtbot.waitUntil(lambda: window.file_menu.recent_data.entries()[:1] == [str(other)], timeout=30_000)
    assert window.file_menu.recent_data.entries()[1] == str(runs.data_file)  # the runs' data, opened before
    assert window.settings.value("paths/data_folder") == str(other.parent)
    choose_in_open_dialog(other, asked)
    window.file_menu.open_data_action.trigger()
    assert asked[-1] == str(other.parent)  # the dialog starts where the last dataset was
    data.open_file(runs.data_file)  # back to the runs' data for the tests after this one


def test_save_run_config_from_the_menu_writes_the_run_file(runs, monkeypatch):
    window = runs.window
    path = runs.root / "configs" / "run.yaml"
    path.parent.mkdir()
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: (str(path), "")))
    action = window.file_menu.save_config_action
    assert action.shortcut() == QKeySequence(QKeySequence.Save)
    action.trigger()
    assert window.current_panel() is window.train_panel
    assert load(path) == window.train_panel.run_config()
    assert window.settings.value("paths/run_config") == str(path.parent)


# ---- recent items and settings -------------------------------------------------------------------------------

def menu_entries(window: MainWindow) -> list[tuple[str, bool]]:
    """The Open recent menu as the user sees it when it opens: (text, enabled), sections as ("# title", ...)."""
    window.file_menu.recent_menu.aboutToShow.emit()
    return [(f"# {a.text()}" if a.isSeparator() and a.text() else a.text(), a.isEnabled())
            for a in window.file_menu.recent_menu.actions() if a.text()]


def test_recent_items_show_in_a_new_window_on_the_same_settings_and_gone_ones_are_disabled(qtbot, settings,
                                                                                               tmp_path, runs):
    first = MainWindow(settings)
    qtbot.addWidget(first)
    assert menu_entries(first) == [("(none yet)", False)]
    gone_data, gone_run = tmp_path / "deleted.jsonl", tmp_path / "deleted-run"
    menu = first.file_menu
    for spec in ("default", str(tmp_path / "deleted-model"), "HuggingFaceTB/SmolLM2-360M"):
        menu.recent_models.remember(spec)
    for i in range(10):  # more than fit: the oldest fall off
        menu.recent_data.remember(str(tmp_path / f"old-{i}.jsonl"))
    menu.recent_data.remember(str(gone_data))
    menu.recent_data.remember(str(runs.data_file))
    menu.recent_runs.remember(str(gone_run))
    menu.recent_runs.remember(str(runs.inside))
    first.close()

    second = MainWindow(settings)
    qtbot.addWidget(second)
    entries = menu_entries(second)
    assert entries[:5] == [("# Models", True), ("HuggingFaceTB/SmolLM2-360M", True),
                           (f"{tmp_path / 'deleted-model'} (gone)", False), ("default", True), ("# Datasets", True)]
    data_entries = entries[5:13]
    assert data_entries[:2] == [(str(runs.data_file), True), (f"{gone_data} (gone)", False)]
    oldest_kept = [f"{tmp_path / f'old-{i}.jsonl'} (gone)" for i in (9, 8, 7, 6, 5, 4)]  # 8 entries in all
    assert [text for text, _ in data_entries[2:]] == oldest_kept
    assert entries[13:] == [("# Runs", True), (str(runs.inside), True), (f"{gone_run} (gone)", False),
                            ("Clear the recent lists", True)]

    def entry(text: str):
        return next(a for a in second.file_menu.recent_menu.actions() if a.text() == text)

    entry(str(runs.data_file)).trigger()
    assert second.current_panel() is second.data_panel and second.data_panel.path_edit.text() == str(runs.data_file)
    entry(str(runs.inside)).trigger()
    listed(second.runs_panel)
    assert second.current_panel() is second.runs_panel
    assert second.runs_panel.selected_run().folder == runs.inside
    entry("Clear the recent lists").trigger()
    assert menu_entries(second) == [("(none yet)", False)]


def test_file_menu_entries_and_standard_shortcuts(qtbot, settings):
    window = MainWindow(settings)
    qtbot.addWidget(window)
    file_menu = window.menuBar().actions()[0].menu()
    texts = [a.text() for a in file_menu.actions() if not a.isSeparator()]
    assert texts == ["Open model &folder…", "Open .&gguf file…", "Open &config only (plan mode)…",
                     "Open &hub id…", "Open the &built-in model", "Open &dataset…", "Open r&un…", "Open &recent",
                     "&Save run config…", "&Quit"]
    shortcuts = {a.text(): a.shortcut() for a in file_menu.actions()}
    assert shortcuts["Open model &folder…"] == QKeySequence(QKeySequence.Open)
    assert shortcuts["&Save run config…"] == QKeySequence(QKeySequence.Save)
    assert shortcuts["&Quit"] == QKeySequence(QKeySequence.Quit)


# ---- Help ----------------------------------------------------------------------------------------------------

def test_copy_versions_and_device_puts_a_bug_report_header_on_the_clipboard(window):
    import peft
    import torch

    help_menu = window.menuBar().actions()[-1].menu()
    entries = [a.text() for a in help_menu.actions()]
    assert entries == ["&About LoRA Studio", "&Copy versions and device"]  # no log path: no log entry
    help_menu.actions()[1].trigger()
    text = QGuiApplication.clipboard().text()
    assert text == window.bug_report_text()
    assert f"torch {torch.__version__}\n" in text and f"peft {peft.__version__}\n" in text
    assert "\nPython 3." in text and f"Training device: {window.opened.machine.description}\n" in text


class UrlCatcher(QObject):
    """Stands in for the desktop's file manager through Qt's own hook for URL schemes."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[QUrl] = []

    @Slot(QUrl)
    def open(self, url: QUrl) -> None:
        self.urls.append(url)


def test_open_log_folder_asks_the_desktop_to_show_the_log_files_folder(qtbot, settings, tmp_path):
    log_path = tmp_path / "state" / "studio.log"
    log_path.parent.mkdir()
    window = MainWindow(settings, log_path=log_path)
    qtbot.addWidget(window)
    catcher = UrlCatcher()
    QDesktopServices.setUrlHandler("file", catcher, "open")
    try:
        entry = next(a for a in window.menuBar().actions()[-1].menu().actions() if "log" in a.text())
        entry.trigger()
    finally:
        QDesktopServices.unsetUrlHandler("file")
    assert [url.toLocalFile() for url in catcher.urls] == [str(log_path.parent)]
