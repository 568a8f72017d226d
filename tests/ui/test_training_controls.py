"""Pause, Resume, Stop and closing the window, on real training runs started from the window: each way of
interrupting a run leaves a checkpoint that a later Resume continues from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QImage
from PySide6.QtWidgets import QMessageBox

from studio.core import events as ev
from studio.core.train.checkpoints import latest_checkpoint
from studio.core.train.run_folder import read_records
from studio.core.units import human_bytes
from studio.ui.main_window import MainWindow
from studio.ui.train_panel import run_history
from studio.ui.training_session import SessionState
from tests.ui.test_screenshots import SIZE, distinct_colours, target
from tests.ui.tiny_run import collect_dead_windows, configure_tiny_run, write_demo_rows

pytestmark = pytest.mark.usefixtures(collect_dead_windows.__name__)


def last(events: list[object], kind: type):
    found = [e for e in events if isinstance(e, kind)]
    return found[-1] if found else None


def recorded_steps(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["event"] == "StepMetrics"]


def test_pause_resume_stop_and_continue_from_the_window(window, qtbot, tmp_path):
    window.resize(*SIZE)
    configure_tiny_run(window, write_demo_rows(tmp_path / "tiny.jsonl", 6), tmp_path / "runs", 4)
    panel, session = window.train_panel, window.train_panel.session
    events: list[object] = []
    session.sig_event.connect(events.append)
    window.show_panel(panel)

    qtbot.mouseClick(panel.start_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: last(events, ev.StepMetrics) is not None, timeout=300_000)
    qtbot.mouseClick(panel.pause_button, Qt.LeftButton)
    assert session.state == SessionState.PAUSING and panel.resume_button.isEnabled()
    qtbot.waitUntil(lambda: session.state == SessionState.PAUSED, timeout=300_000)
    paused = last(events, ev.Paused)
    checkpoint = Path(paused.checkpoint)
    assert checkpoint.name == f"step-{paused.step}" and (checkpoint / "trainer_state.json").is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == paused.step
    assert not panel.pause_button.isEnabled() and panel.resume_button.isEnabled() and panel.stop_button.isEnabled()
    assert panel.speed_label.text() == "Paused"
    for tab, name in ((panel, "train-panel-paused.png"), (window.spectrum_panel, "spectrum-panel-during-run.png")):
        window.show_panel(tab)
        qtbot.wait(150)
        path = target(tmp_path, name)
        assert window.grab().save(str(path)) and QImage(str(path)).size().toTuple() == SIZE
        assert distinct_colours(path) > 20
    assert window.spectrum_panel.grid is not None  # drawn on showing, from the snapshots of the paused run
    window.show_panel(panel)

    qtbot.mouseClick(panel.resume_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: last(events, ev.Resumed) is not None, timeout=60_000)
    qtbot.mouseClick(panel.stop_button, Qt.LeftButton)
    assert session.state == SessionState.STOPPING and not panel.stop_button.isEnabled()
    qtbot.waitUntil(lambda: not session.is_active(), timeout=300_000)
    stopped = last(events, ev.Finished)
    assert stopped.stopped_early and stopped.step == paused.step + 1
    run_dir = Path(stopped.run_dir)
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / f"step-{stopped.step}"
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert panel.resume_button.isEnabled() and panel.start_button.isEnabled()

    panel.form.max_steps.setValue(stopped.step + 1)  # Resume continues the stopped run to the new budget
    qtbot.mouseClick(panel.resume_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not session.is_active() and last(events, ev.Finished) is not stopped, timeout=300_000)
    finished = last(events, ev.Finished)
    assert not finished.stopped_early and finished.step == stopped.step + 1 and finished.run_dir == str(run_dir)
    assert last(events, ev.RunStarted).start_step == stopped.step
    steps = list(range(1, finished.step + 1))
    assert recorded_steps(run_dir) == steps
    assert panel.plots.loss_raw.buffer.x.tolist() == [float(s) for s in steps]


def test_closing_the_window_during_training_asks_then_stops_with_a_checkpoint(qtbot, settings, opened_default,
                                                                               tmp_path):
    window = MainWindow(settings)
    qtbot.addWidget(window)
    window.show()
    window.show_model(opened_default)
    configure_tiny_run(window, write_demo_rows(tmp_path / "tiny.jsonl", 6), tmp_path / "runs", 20)
    session = window.train_panel.session
    events: list[object] = []
    session.sig_event.connect(events.append)
    questions: list[str] = []

    def answer(button: QMessageBox.StandardButton) -> None:
        box = window.close_question
        if box is None or not box.isVisible():
            QTimer.singleShot(20, lambda: answer(button))
            return
        questions.append(box.text())
        box.button(button).click()

    window.train_panel.start()
    qtbot.waitUntil(lambda: last(events, ev.StepMetrics) is not None, timeout=300_000)

    QTimer.singleShot(20, lambda: answer(QMessageBox.No))
    assert window.close() is False  # "No": the run goes on
    assert session.is_active() and session.state == SessionState.RUNNING and window.isVisible()

    QTimer.singleShot(20, lambda: answer(QMessageBox.Yes))
    assert window.close() is False  # "Yes": the window waits for the run to save, then closes itself
    assert session.state == SessionState.STOPPING
    qtbot.waitUntil(lambda: not window.isVisible(), timeout=300_000)
    assert not session.is_active()
    assert len(questions) == 2 and questions[0].startswith("Stop the run and close?")
    finished = last(events, ev.Finished)
    assert finished is not None and finished.stopped_early and finished.step < 20
    checkpoint = latest_checkpoint(finished.run_dir)
    assert checkpoint is not None and checkpoint.name == f"step-{finished.step}"


@pytest.mark.parametrize("missing", ["targets", "model"])
def test_start_without_targets_or_model_shows_the_reason_and_starts_nothing(qtbot, window, settings, missing):
    if missing == "targets":
        window.plan_state.replace_selection([])
        panel = window.train_panel
    else:
        other = MainWindow(settings)
        qtbot.addWidget(other)
        panel = other.train_panel
    assert panel.start() is False
    assert not panel.session.is_active() and panel.error_label.isVisibleTo(panel)
    expected = ("Cannot start: plan.targets is missing" if missing == "targets"
                else "Cannot start: open a model first")
    assert panel.error_label.text().startswith(expected)


def test_a_run_that_fails_shows_the_one_line_reason_in_a_dialog_and_the_log(window, qtbot, tmp_path):
    configure_tiny_run(window, write_demo_rows(tmp_path / "tiny.jsonl", 4), tmp_path / "runs", 3)
    panel = window.train_panel
    panel.form.max_length.setValue(40)  # shorter than the chat template before any answer: no usable row
    with qtbot.waitSignal(panel.sig_run_finished, timeout=300_000) as finished:
        assert panel.start()
    failed = finished.args[0]
    assert isinstance(failed, ev.Failed) and failed.step == 0 and failed.checkpoint is None
    assert failed.message.endswith("has no usable rows (4 bad): see the bad rows")
    dialog = panel.failure_dialog
    assert dialog is not None and dialog.isVisible() and dialog.windowTitle() == "Training stopped"
    assert dialog.text() == f"{failed.message}\n\nNo checkpoint was saved before this point."
    assert ev.describe(failed) == failed.message  # refused before its first step: the reason alone
    assert failed.message in panel.log_view.toPlainText()
    qtbot.waitUntil(lambda: not panel.session.is_active())
    assert panel.start_button.isEnabled() and not panel.resume_button.isEnabled()
    dialog.close()


def test_a_run_whose_loss_became_nan_leaves_the_window_alive_and_resumes_with_a_lower_learning_rate(
        qtbot, settings, opened_tiny, tmp_path):
    window = MainWindow(settings)
    qtbot.addWidget(window)
    window.show()
    window.show_model(opened_tiny)
    configure_tiny_run(window, write_demo_rows(tmp_path / "tiny.jsonl", 16), tmp_path / "runs", 6, save_every=1)
    panel = window.train_panel
    window.plan_state.update(dropout=0.0)
    panel.form.max_length.setValue(96)
    panel.form.batch_size.setValue(4)
    panel.form.seed.setValue(7)
    panel.form.schedule.setCurrentText("constant")
    panel.form.spectrum_every.setValue(0)
    panel.form.learning_rate.setValue(1e4)  # the weights after step 2 make the loss of step 3 infinite
    with qtbot.waitSignal(panel.sig_run_finished, timeout=300_000) as finished:
        assert panel.start()
    failed = finished.args[0]
    assert isinstance(failed, ev.Failed) and failed.step == 2
    assert failed.message == ("the loss became infinite at step 3: lower the learning rate (now 10000) or use "
                              "precision bf16 instead of fp16")
    run_dir = panel.session.run_dir
    assert failed.checkpoint == str(run_dir / "checkpoints" / "step-1")  # step 2's weights are set aside
    dialog = panel.failure_dialog
    assert dialog.isVisible() and dialog.text().startswith(f"{failed.message}\n\nThe last checkpoint is "
                                                           f"{failed.checkpoint}: Resume continues from there")
    qtbot.waitUntil(lambda: not panel.session.is_active())
    assert window.isVisible() and panel.resume_button.isEnabled() and panel.start_button.isEnabled()
    dialog.close()

    panel.form.learning_rate.setValue(1e-3)
    with qtbot.waitSignal(panel.sig_run_finished, timeout=300_000) as resumed:
        qtbot.mouseClick(panel.resume_button, Qt.LeftButton)
    result = resumed.args[0]
    assert isinstance(result, ev.Finished) and result.step == 6 and result.run_dir == str(run_dir)
    assert "resumed with changed settings: learning_rate 10000.0 -> 0.001" in panel.log_view.toPlainText()
    assert recorded_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    # what Resume in the Runs tab draws: each step once, step 2 as it was redone (the failed run's record too)
    history = run_history(run_dir)
    assert [m.step for m in history.steps] == [1, 2, 3, 4, 5, 6]
    assert [m.loss for m in history.steps] == panel.plots.loss_raw.buffer.y.tolist()
    qtbot.waitUntil(lambda: not panel.session.is_active())


def test_resuming_a_run_file_that_lets_the_model_run_its_own_code_warns_first(qtbot, window, tiny_model_folder,
                                                                               tmp_path):
    from studio.core.runconfig import ModelConfig, RunConfig, TrainingConfig
    from studio.core.train.engine import train

    config = RunConfig(model=ModelConfig(source=str(tiny_model_folder), device="cpu", trust_remote_code=True),
                       plan={"targets": "q_proj", "rank": 2}, data={"train_path": str(write_demo_rows(
                           tmp_path / "tiny.jsonl", 4)), "max_length": 96},
                       training=TrainingConfig(max_steps=2, batch_size=2, save_every=1, eval_every=0,
                                               spectrum_every=0), output_dir=str(tmp_path / "runs"))
    first = train(config)
    assert isinstance(first, ev.Finished), first
    panel = window.train_panel
    with qtbot.waitSignal(panel.sig_run_finished, timeout=300_000) as resumed:
        panel.continue_run(first.run_dir)
        qtbot.waitUntil(lambda: panel.remote_code_dialog is not None)  # once the run's curves are read
        dialog = panel.remote_code_dialog
        assert dialog.isVisible()
        assert dialog.text() == (f"Model.trust_remote_code is true: Python code that comes with {tiny_model_folder} "
                                 "will run on this machine with your permissions; keep it only for a model source "
                                 "you trust")
    assert isinstance(resumed.args[0], ev.Finished)
    assert panel.log_view.toPlainText().count("trust_remote_code is true") == 1
    dialog.close()
    qtbot.waitUntil(lambda: not panel.session.is_active())


def test_on_several_gpus_the_window_trains_one_process_each_and_its_plots_follow_them(
        qtbot, settings, opened_tiny, tmp_path):
    """A machine with two GPUs, as the form sees it; the tiny model trains on the CPU here, two gloo processes
    started through accelerate, exactly the path two CUDA GPUs take."""
    window = MainWindow(settings)
    qtbot.addWidget(window)
    window.show()
    window.show_model(opened_tiny)
    configure_tiny_run(window, write_demo_rows(tmp_path / "tiny.jsonl", 16), tmp_path / "runs", 4, save_every=2)
    panel = window.train_panel
    assert panel.form.gpus.isHidden() and panel.form.processes() == 1  # this machine: no CUDA GPU
    panel.form.set_gpu_count(2)
    assert not panel.form.gpus.isHidden() and panel.form.processes() == 2
    events: list = []
    panel.session.sig_event.connect(events.append)
    with qtbot.waitSignal(panel.sig_run_finished, timeout=300_000) as finished:
        assert panel.start()
    result = finished.args[0]
    assert isinstance(result, ev.Finished) and result.step == 4, result
    started = last(events, ev.RunStarted)
    assert started.processes == 2
    assert [e.step for e in events if isinstance(e, ev.StepMetrics)] == [1, 2, 3, 4]
    assert panel.progress.value() == 4
    run_dir = Path(result.run_dir)
    assert recorded_steps(run_dir) == [1, 2, 3, 4] and latest_checkpoint(run_dir).name == "step-2"
    qtbot.waitUntil(lambda: not panel.session.is_active())


def test_a_ticked_shard_box_trains_sharded_prices_each_gpu_sharded_and_resumes_sharded(
        qtbot, settings, opened_tiny, tmp_path):
    """"Shard the base (FSDP)" on a machine the form sees with two GPUs: the estimate becomes each GPU's with the
    base sharded, the run's two gloo processes shard the model, and Resume launches them sharded again (as the
    checkpoint says) without the box's say."""
    window = MainWindow(settings)
    qtbot.addWidget(window)
    window.show()
    window.show_model(opened_tiny)
    configure_tiny_run(window, write_demo_rows(tmp_path / "tiny.jsonl", 16), tmp_path / "runs", 4, save_every=2)
    panel, verdict = window.train_panel, window.adapter_panel.verdict_label
    assert panel.form.shard.isHidden()  # this machine: no CUDA GPU
    panel.form.set_gpu_count(2)
    panel.form.gpus.setValue(1)
    assert not panel.form.shard.isEnabled()  # one GPU has no one to share with
    panel.form.gpus.setValue(2)
    whole = window.adapter_panel.numbers.estimate
    assert panel.form.shard.isEnabled() and "on each of 2 GPUs" in verdict.text() and "sharded" not in verdict.text()
    panel.form.shard.setChecked(True)
    sharded = window.adapter_panel.numbers.estimate
    assert sharded.adapter < whole.adapter and sharded.weights != whole.weights  # each GPU's slice
    assert f"~{human_bytes(sharded.total)} " in verdict.text()
    assert verdict.text().endswith("on each of 2 GPUs, the base sharded (FSDP)")

    with qtbot.waitSignal(panel.sig_run_finished, timeout=300_000) as finished:
        assert panel.start()
    result = finished.args[0]
    assert isinstance(result, ev.Finished) and result.step == 4, result
    run_dir = Path(result.run_dir)
    assert any(r["event"] == "LogMessage" and r["text"].startswith("FSDP: each of the 2 processes holds a slice")
               for r in read_records(run_dir))
    assert "the base sharded between them (FSDP)" in panel.log_view.toPlainText()
    qtbot.waitUntil(lambda: not panel.session.is_active())

    panel.form.shard.setChecked(False)  # a resume follows the checkpoint, not the box
    panel.form.max_steps.setValue(6)
    with qtbot.waitSignal(panel.sig_run_finished, timeout=300_000) as finished:
        panel.resume()
    assert isinstance(finished.args[0], ev.Finished) and finished.args[0].step == 6, finished.args[0]
    assert "Resuming on 2 processes with FSDP, as the run was trained" in panel.log_view.toPlainText()
    assert recorded_steps(run_dir)[-3:] == [4, 5, 6]
    qtbot.waitUntil(lambda: not panel.session.is_active())
