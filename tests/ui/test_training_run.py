"""One real training run started from the window (Start clicked), shared by the tests of this module: the live
plots, the spectrum panel, the log, the window's responsiveness, and the Adapter menu on the run's adapter."""

from __future__ import annotations

import gc
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QCoreApplication, QEvent, QSettings, Qt
from PySide6.QtGui import QImage
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QFileDialog, QMessageBox

from studio.core import events as ev
from studio.core.adapters.spectrum import advise_ranks, read_adapter_spectra
from studio.core.data.formats import prompt_inputs
from studio.core.files import MANIFEST
from studio.core.runconfig import load
from studio.core.train.run_folder import read_curves
from studio.ui.main_window import MainWindow
from studio.ui.playground import DEFAULT_PROMPT
from studio.ui.training_session import SessionState
from tests.ui.test_screenshots import SIZE, distinct_colours, target
from tests.ui.tiny_run import Heartbeat, configure_tiny_run, wait_until, write_demo_rows

STEPS = 4
WORST_GAP_LIMIT_S = 0.1


@dataclass
class FinishedRun:
    window: MainWindow
    events: list[object]
    heartbeat: Heartbeat
    started: float  # perf_counter when Start was clicked
    root: Path

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def finished(self) -> ev.Finished:
        return self.of(ev.Finished)[-1]


@pytest.fixture(scope="module")
def run(qapp, opened_default, tmp_path_factory):
    root = tmp_path_factory.mktemp("gui-run")
    window = MainWindow(QSettings(str(root / "settings.ini"), QSettings.IniFormat))
    window.resize(*SIZE)
    window.show()
    window.show_model(opened_default)
    configure_tiny_run(window, write_demo_rows(root / "tiny.jsonl", 8), root / "runs", STEPS, val_fraction=0.25,
                       save_every=2, eval_every=2)
    window.show_panel(window.train_panel)
    events: list[object] = []
    window.train_panel.session.sig_event.connect(events.append)
    heartbeat = Heartbeat()
    heartbeat.start()
    started = time.perf_counter()
    QTest.mouseClick(window.train_panel.start_button, Qt.LeftButton)
    wait_until(lambda: any(isinstance(e, (ev.Finished, ev.Failed)) for e in events)
               and not window.train_panel.session.is_active(), 600, "the run to finish")
    heartbeat.stop()
    yield FinishedRun(window, events, heartbeat, started, root)
    window.close()
    window.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)
    gc.collect()  # now, not during a later test that measures the UI (see tiny_run.collect_dead_windows)


def test_the_run_started_from_the_window_finishes_and_the_buttons_go_back_to_idle(run):
    assert not run.of(ev.Failed), run.of(ev.Failed)
    finished = run.finished
    assert finished.step == STEPS and not finished.stopped_early
    panel = run.window.train_panel
    assert panel.start_button.isEnabled() and not panel.pause_button.isEnabled() and not panel.stop_button.isEnabled()
    assert panel.progress.value() == panel.progress.maximum() == STEPS
    last = run.of(ev.StepMetrics)[-1]
    assert panel.speed_label.text() == f"ETA 0:00 · {last.tokens_per_s:,.0f} real tokens/s"
    assert (Path(finished.adapter_dir) / "adapter_config.json").is_file()
    assert "Finished at step 4" in panel.log_view.toPlainText()
    assert f"Checkpoint at step 2: {finished.run_dir}/checkpoints/step-2" in panel.log_view.toPlainText()
    # the log says each event in the core's words, the same the CLI prints (tests/cli/test_cli_training.py)
    said = [ev.describe(e) for e in run.events if not isinstance(e, (ev.StepMetrics, ev.SpectrumSnapshot))]
    assert said and all(text in panel.log_view.toPlainText() for text in said)
    assert ev.describe(run.of(ev.RunStarted)[0]).startswith(f"Run folder {finished.run_dir}: ")


def test_every_step_adds_one_loss_point_and_every_evaluation_one_validation_point(run):
    steps = run.of(ev.StepMetrics)
    plots = run.window.train_panel.plots
    assert len(steps) == STEPS
    assert plots.loss_raw.buffer.x.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert plots.loss_raw.buffer.y.tolist() == [m.loss for m in steps]
    assert plots.lr.buffer.y.tolist() == [m.lr for m in steps]
    assert plots.grad_norm.buffer.y.tolist() == [m.grad_norm for m in steps]
    evals = run.of(ev.EvalMetrics)
    assert [e.step for e in evals] == [2, 4]  # eval_every=2, and the final one
    assert plots.val_loss.buffer.y.tolist() == [e.val_loss for e in evals]
    s = plots.smoothing  # TensorBoard's debiased moving average, checked by hand for the last point
    weights = np.array([(1 - s) * s ** (STEPS - 1 - i) for i in range(STEPS)])
    expected = float(weights @ np.array([m.loss for m in steps]) / (1 - s**STEPS))
    assert plots.loss_smooth.buffer.y[-1] == pytest.approx(expected)
    drawn_x, drawn_y = plots.loss_raw.item.getData()  # what the curve item holds after the redraw timer
    assert drawn_x.tolist() == [1.0, 2.0, 3.0, 4.0] and drawn_y.tolist() == [m.loss for m in steps]
    assert not plots.memory_widget.isVisible() and "CPU" in plots.memory_label.text()


def test_the_spectrum_panel_shows_the_last_snapshot_as_heatmap_curves_and_advice(run, qtbot):
    window = run.window
    window.show_panel(window.spectrum_panel)  # a hidden panel draws when it is shown
    panel = window.spectrum_panel
    last = run.of(ev.SpectrumSnapshot)[-1]
    assert len(run.of(ev.SpectrumSnapshot)) >= STEPS
    grid = panel.grid
    assert grid is not None and grid.kinds == ("q_proj", "v_proj") and grid.layers == tuple(range(30))
    by_name = {m.name: m for m in last.modules}
    assert grid.values[7, 1] == by_name["model.layers.7.self_attn.v_proj"].effective_rank_90
    assert np.isfinite(grid.values).all() and panel.image.image.shape == (30, 2)
    assert set(panel.curves) == set(panel.checked_modules()) and len(panel.curves) == 4
    curve = panel.curves["model.layers.0.self_attn.q_proj"]  # xData/yData: the values before the log axis
    assert curve.xData.tolist() == [1.0, 2.0, 3.0, 4.0]
    np.testing.assert_allclose(curve.yData, by_name["model.layers.0.self_attn.q_proj"].values)
    assert advise_ranks(last.modules).summary in panel.advice_label.text()
    panel.metric_combo.setCurrentIndex(panel.metric_combo.findData("top1"))
    assert panel.grid.values[7, 1] == pytest.approx(by_name["model.layers.7.self_attn.v_proj"].top1_energy)
    panel.metric_combo.setCurrentIndex(panel.metric_combo.findData("rank"))


def test_the_window_answers_within_100_ms_during_the_whole_run(run):
    gaps = run.heartbeat.gaps(run.started)
    steps = run.of(ev.StepMetrics)
    worst, when = max(gaps)
    print(f"\nUI heartbeat during a {STEPS}-step GUI run: {len(gaps) + 1} beats, worst gap {1000 * worst:.0f} ms "
          f"at {when - run.started:.1f} s after Start (run took {steps[-1].elapsed_s:.1f} s of training)")
    assert len(gaps) > 100  # the timer really ran during the run
    assert worst < WORST_GAP_LIMIT_S


def test_save_run_config_writes_the_run_file_the_cli_runs(run, monkeypatch):
    path = run.root / "saved" / "run.yaml"
    path.parent.mkdir()
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *args, **kwargs: (str(path), "")))
    run.window.train_panel.save_config_button.click()
    saved = load(path)
    assert saved == run.window.train_panel.run_config()
    assert saved.training.max_steps == STEPS and saved.data["max_length"] == 72 and saved.plan["rank"] == 4
    assert len(saved.plan["targets"]) == 60 and saved.plan["targets"][0] == "model.layers.0.self_attn.q_proj"
    assert saved.data["val_fraction"] == 0.25


def test_export_adapter_from_the_menu_writes_an_adapter_peft_loads(run, qtbot, monkeypatch, fresh_default_model):
    from peft import PeftModel
    from safetensors.torch import load_file

    chosen = run.root / "exported"
    chosen.mkdir()
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", staticmethod(lambda *args, **kwargs: str(chosen)))
    actions = run.window.adapter_actions
    assert actions.export_action.isEnabled()
    with qtbot.waitSignal(actions.sig_message, timeout=60_000) as message:
        actions.export_action.trigger()
    assert message.args[0] == f"The adapter was saved to {chosen}"
    assert actions.message_box.text() == message.args[0]
    model = PeftModel.from_pretrained(fresh_default_model.model, str(chosen))
    assert model.peft_config["default"].r == 4
    saved = load_file(str(chosen / "adapter_model.safetensors"))
    original = load_file(str(Path(run.finished.adapter_dir) / "adapter_model.safetensors"))
    assert saved.keys() == original.keys() and len(saved) == 120
    key = "base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"
    assert model.base_model.model.model.layers[3].self_attn.v_proj.lora_B["default"].weight.equal(original[key])


def test_export_into_a_folder_that_holds_files_writes_a_new_folder_inside_it(run, qtbot, monkeypatch):
    chosen = run.root / "busy"
    chosen.mkdir()
    (chosen / "notes.txt").write_text("mine")
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", staticmethod(lambda *args, **kwargs: str(chosen)))
    with qtbot.waitSignal(run.window.adapter_actions.sig_message, timeout=60_000) as message:
        run.window.adapter_actions.export_action.trigger()
    inside = chosen / f"{Path(run.finished.run_dir).name}-adapter"
    assert message.args[0] == f"The adapter was saved to {inside}"
    assert (inside / "adapter_config.json").is_file() and (chosen / "notes.txt").read_text() == "mine"


def test_load_adapter_from_the_menu_shows_its_spectra(run, qtbot, monkeypatch):
    folder = Path(run.finished.adapter_dir)
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", staticmethod(lambda *args, **kwargs: str(folder)))
    actions = run.window.adapter_actions
    with qtbot.waitSignal(actions.sig_spectra_loaded, timeout=60_000):
        actions.load_action.trigger()
    qtbot.waitUntil(lambda: not actions.is_busy())
    panel = run.window.spectrum_panel
    assert run.window.current_panel() is panel and str(folder) in panel.source_label.text()
    expected = read_adapter_spectra(folder)
    assert [s.name for s in panel.spectra] == [s.name for s in expected]
    np.testing.assert_allclose(panel.spectra[5].values, expected[5].values)
    assert actions.message_box.text().startswith(f"Loaded the adapter in {folder}: lora r=4, α=8")
    assert actions.adapter.folder == folder and actions.merge_action.isEnabled()


def test_merge_and_save_ends_with_the_folder_and_the_max_logit_difference(run, qtbot, monkeypatch):
    actions = run.window.adapter_actions
    actions.set_run_result(run.finished, "default")
    chosen = run.root / "merged"
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", staticmethod(lambda *args, **kwargs: str(chosen)))
    with qtbot.waitSignal(actions.sig_message, timeout=300_000) as message:
        actions.merge_action.trigger()
        assert actions.progress_dialog is not None and not actions.merge_action.isEnabled()
    text = message.args[0]
    assert text.startswith(f"The merged model was saved to {chosen} in ")
    diff = float(re.search(r"Max logit difference against base \+ adapter: ([0-9.]+(?:e[+-]?[0-9]+)?)", text).group(1))
    assert diff < 1e-3
    assert (chosen / "config.json").is_file() and (chosen / "model.safetensors").is_file()
    assert json.loads((chosen / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    qtbot.waitUntil(lambda: actions.progress_dialog is None)


def test_export_gguf_from_the_menu_asks_before_replacing_a_file_and_writes_one_llama_cpp_runs(run, qtbot,
                                                                                               monkeypatch):
    from studio.ui.adapter_actions import GGUF_FILTERS

    actions = run.window.adapter_actions
    actions.set_run_result(run.finished, "default")
    chosen = run.root / "gguf" / "dates"  # no suffix typed: the studio adds .gguf
    chosen.parent.mkdir()
    target = chosen.with_suffix(".gguf")
    target.write_bytes(b"a person's model")
    q8_filter = next(name for name, kind in GGUF_FILTERS.items() if kind == "q8_0")
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *args, **kwargs: (str(chosen), q8_filter)))
    actions.gguf_action.trigger()
    question = actions.replace_question
    assert question is not None and question.isVisible() and not actions.is_busy()
    assert question.text() == f"{target} is a file LoRA Studio did not write. Replace it?"
    question.button(QMessageBox.Cancel).click()
    assert not actions.is_busy() and target.read_bytes() == b"a person's model"

    actions.gguf_action.trigger()
    with qtbot.waitSignal(actions.sig_message, timeout=300_000) as message:
        actions.replace_question.button(QMessageBox.Yes).click()
        assert actions.progress_dialog is not None and not actions.gguf_action.isEnabled()
    text = message.args[0]
    assert text.startswith(f"The GGUF file was saved to {target} (q8_0, "), text
    agreed, probed = map(int, re.search(r"agrees with the merged model on (\d+) of (\d+)", text).groups())
    assert probed > 20 and agreed >= 0.8 * probed  # q8_0 rounds the weights: most next tokens stay the same
    assert target.read_bytes()[:4] == b"GGUF"
    assert (target.parent / "Modelfile").read_text().startswith(f"FROM ./{target.name}")
    assert sorted(p.name for p in target.parent.iterdir()) == [MANIFEST, "Modelfile", "dates.gguf"]  # no temp left
    qtbot.waitUntil(lambda: actions.progress_dialog is None)


def test_the_runs_panel_lists_the_run_and_overlays_its_loss_curve(run, qtbot):
    window = run.window
    window.show_panel(window.runs_panel)
    panel = window.runs_panel
    wait_until(lambda: not panel.is_listing(), 30, "the runs panel to read the run folder")
    steps = run.of(ev.StepMetrics)
    assert [r.folder for r in panel.runs] == [Path(run.finished.run_dir)]
    summary = panel.runs[0]
    assert (summary.status, summary.steps_done, summary.total_steps) == ("finished", STEPS, STEPS)
    assert summary.final_loss == steps[-1].loss
    assert read_curves(summary.folder).losses == tuple((m.step, m.loss) for m in steps)
    item = panel.table.topLevelItem(0)
    assert [item.text(i) for i in (1, 2, 4, 5, 6)] == ["finished", f"{steps[-1].loss:.4f}", "4 / 4", "default",
                                                        "60 modules · r=4"]
    panel.set_ticked([run.finished.run_dir])
    wait_until(lambda: run.finished.run_dir in panel.curves, 30, "the ticked run's curves")
    curve = panel.curves[run.finished.run_dir]
    assert curve.xData.tolist() == [1, 2, 3, 4] and curve.yData.tolist() == [m.loss for m in steps]
    panel.table.setCurrentItem(item)
    assert panel.resume_button.isEnabled() and panel.spectra_button.isEnabled()
    panel.spectra_button.click()
    wait_until(lambda: window.current_panel() is window.spectrum_panel, 30, "the last spectrum to be read")
    last = run.of(ev.SpectrumSnapshot)[-1]
    assert window.spectrum_panel.spectra == last.modules
    assert f"step {last.step}" in window.spectrum_panel.source_label.text()


def test_the_playground_answers_with_and_without_the_adapter_as_peft_does(run, qtbot, fresh_default_model):
    import torch
    from peft import PeftModel

    window = run.window
    window.adapter_actions.set_run_result(run.finished, "default")  # the run's adapter, for every panel
    window.show_panel(window.playground)
    playground = window.playground
    playground.new_tokens.setValue(8)
    assert playground.generate_button.isEnabled()
    playground.generate_button.click()
    assert playground.is_busy() and not playground.generate_button.isEnabled()
    qtbot.waitUntil(lambda: not playground.is_busy(), timeout=300_000)
    answers = playground.last_answers
    assert answers is not None and answers.prompt == DEFAULT_PROMPT, playground.status_label.text()

    tokenizer = fresh_default_model.tokenizer
    ids = prompt_inputs(tokenizer, DEFAULT_PROMPT)["input_ids"]

    def greedy(model) -> str:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    assert answers.base == greedy(fresh_default_model.model.eval())
    adapted = PeftModel.from_pretrained(fresh_default_model.model, run.finished.adapter_dir).eval()
    assert answers.adapted == greedy(adapted)
    assert playground.base_view.toPlainText() == answers.base
    assert playground.adapted_view.toPlainText() == answers.adapted


@pytest.mark.parametrize("tab", ["train", "spectrum", "data", "runs", "playground"])
def test_screenshot_after_the_run(run, tab, tmp_path, qtbot):
    window = run.window
    window.show_panel({"train": window.train_panel, "spectrum": window.spectrum_panel, "data": window.data_panel,
                       "runs": window.runs_panel, "playground": window.playground}[tab])
    wait_until(lambda: not window.runs_panel.is_listing(), 30, "the runs panel to read the run folders")
    qtbot.wait(150)  # the redraw timer and the layout settle
    path = target(tmp_path, f"{tab}-panel-after-run.png")
    assert window.grab().save(str(path))
    assert QImage(str(path)).size().toTuple() == SIZE
    assert distinct_colours(path) > 20


def test_resume_from_the_runs_panel_shows_the_history_and_continues_from_the_checkpoint(run, qtbot):
    window = run.window
    window.show_panel(window.runs_panel)
    panel = window.runs_panel
    wait_until(lambda: not panel.is_listing(), 30, "the runs panel to read the run folder")
    panel.table.setCurrentItem(panel.table.topLevelItem(0))
    session = window.train_panel.session
    original = run.of(ev.StepMetrics)
    events: list[object] = []
    session.sig_event.connect(events.append)
    plots = window.train_panel.plots
    shown_at_start: list[list[float]] = []  # the curves as the session starts running: the history, read off the
    session.sig_state_changed.connect(  # UI thread, is drawn before the run resumes
        lambda state: shown_at_start.append(plots.loss_raw.buffer.x.tolist()) if state is SessionState.RUNNING
        else None)
    panel.resume_button.click()  # the run's newest checkpoint is step 2: steps 3 and 4 run again
    assert window.current_panel() is window.train_panel
    qtbot.waitUntil(lambda: bool(shown_at_start), timeout=30_000)
    assert shown_at_start[0] == [1.0, 2.0, 3.0, 4.0]
    qtbot.waitUntil(lambda: not session.is_active(), timeout=300_000)
    started = next(e for e in events if isinstance(e, ev.RunStarted))
    assert started.start_step == 2 and started.run_dir == run.finished.run_dir
    assert events[-1].step == STEPS and isinstance(events[-1], ev.Finished)
    assert plots.loss_raw.buffer.x.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert plots.loss_raw.buffer.y[:2].tolist() == [m.loss for m in original[:2]]
    assert plots.loss_raw.buffer.y[2:].tolist() == pytest.approx([m.loss for m in original[2:]], rel=1e-4)
