"""The data panel on real files and the real tokenizer: the demo preselected, bad rows with their row numbers (a
list model, however many), the preview's loss highlighting against the core's preview, the length histogram and its
max-length line, long rows as windows or cut prompts, epochs in steps, and a hub dataset id in the Open dialog."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QImage

from studio.core.data.dataset import DEMO_DIR, demo_spec, prepare, preview
from studio.ui.data_panel import LOSS_COLOURS, SIDE_BY_SIDE_WIDTH, STACKED_PREVIEW_HEIGHT
from tests.core.data.test_hub import hub_cache
from tests.ui.test_screenshots import SIZE, distinct_colours, target
from tests.ui.tiny_run import collect_dead_windows, wait_until

pytestmark = pytest.mark.usefixtures(collect_dead_windows.__name__)


def settled(panel) -> bool:
    analysis = panel.analysis
    return (analysis is not None and not panel.jobs.is_busy() and not panel._refresh_timer.isActive()
            and analysis.spec == panel.spec() and (analysis.prepared is not None or analysis.error is not None))


def shown_bad_rows(panel) -> list[str]:
    """The bad-row list's lines, as its view shows them."""
    model = panel.bad_rows_list.model()
    return [model.index(i).data() for i in range(model.rowCount())]


def highlighted_text(panel) -> list[str]:
    """The runs of text the preview shows on a loss colour, read back from the document Qt laid out."""
    document = panel.preview_view.document()
    runs: list[str] = []
    block = document.begin()
    while block.isValid():
        iterator = block.begin()
        while not iterator.atEnd():
            fragment = iterator.fragment()
            if fragment.charFormat().background().color().name() in LOSS_COLOURS:
                runs.append(fragment.text())
            iterator += 1
        block = block.next()
    return runs


def test_a_new_window_starts_on_the_built_in_demo_ready_to_train(window):
    panel = window.data_panel
    assert panel.analysis is None or panel.analysis.prepared is None  # hidden: nothing tokenized in the background
    window.show_panel(panel)
    wait_until(lambda: settled(panel), 60, "the demo to be analysed")
    expected = replace(demo_spec(), max_length=window.train_panel.form.max_length.value())
    assert panel.spec() == expected
    prepared = panel.analysis.prepared
    assert (len(prepared.train), len(prepared.val)) == (300, 60) and not prepared.bad_rows
    assert panel.bad_rows_label.text() == "No bad rows" and shown_bad_rows(panel) == []
    assert window.train_panel.start_button.isEnabled()
    assert "auto (prompt)" in [panel.columns.combos["prompt"].itemText(i) for i in range(3)]


def test_a_csv_with_missing_values_lists_its_bad_rows_with_their_row_numbers(window, tmp_path, default_tokenizer):
    path = tmp_path / "questions.csv"
    path.write_text('prompt,response\n"What is 2+2?",4\n"Only a prompt"\n"Empty answer",\n'
                    '"Capital of France?",Paris\n')
    panel = window.data_panel
    window.show_panel(panel)
    panel.open_file(path)
    wait_until(lambda: settled(panel) and panel.analysis.spec.train_path == str(path), 60, "the CSV to be read")
    core = prepare(panel.spec(), default_tokenizer)
    assert [(b.row, b.reason) for b in core.bad_rows] == [(3, "has 1 fields, the header has 2"),
                                                          (4, "'response' is empty")]
    assert shown_bad_rows(panel) == ["questions.csv, row 3: has 1 fields, the header has 2",
                     "questions.csv, row 4: 'response' is empty"]
    assert panel.bad_rows_label.text() == "2 bad rows (left out of training)"
    assert "<b>2</b> training" in panel.summary_label.text()
    panel.show_row(2)  # the short row: the preview says why it is left out
    wait_until(lambda: panel.shown_preview is not None and panel.shown_preview.row == 3, 30, "row 2's preview")
    assert "Row 3 is left out" in panel.preview_view.toPlainText()


def test_the_preview_highlights_exactly_the_tokens_that_carry_the_loss(window, default_tokenizer):
    panel = window.data_panel
    window.show_panel(panel)
    wait_until(lambda: settled(panel), 60, "the demo to be analysed")
    panel.show_row(5)
    wait_until(lambda: panel.shown_preview is not None and panel.shown_preview.row == 5, 30, "row 5's preview")
    core = preview(panel.spec(), default_tokenizer, 4)
    assert panel.shown_preview == core
    response = json.loads((DEMO_DIR / "train.jsonl").read_text().splitlines()[4])["response"]
    loss_text = "".join(piece for piece, carries in core.tokens if carries)
    assert loss_text == response + "<|im_end|>"  # the answer and its end-of-turn token, nothing else
    assert "".join(highlighted_text(panel)) == loss_text
    shown = panel.preview_view.toPlainText().replace("\u2029", "\n").replace("\u2028", "\n")
    assert shown == "".join(piece for piece, _ in core.tokens)
    assert f"{sum(1 for _, carries in core.tokens if carries)} carry the loss" in panel.row_label.text()


def test_the_histogram_counts_every_training_example_and_marks_the_max_length(window):
    panel = window.data_panel
    window.show_panel(panel)
    wait_until(lambda: settled(panel), 60, "the demo to be analysed")
    window.train_panel.form.max_length.setValue(64)  # the train form owns the max length; the panel follows
    wait_until(lambda: settled(panel) and panel.analysis.spec.max_length == 64, 60, "the re-analysis at 64 tokens")
    stats = panel.analysis.prepared.stats
    heights = panel.histogram.bars.opts["height"]
    over = panel.histogram.over_bars.opts["height"]
    assert int(np.sum(heights)) + int(np.sum(over)) == stats.count == 300
    assert panel.histogram.max_line.value() == 64 and window.adapter_panel.seq_spin.value() == 64
    cut = int(np.sum(np.asarray(stats.lengths) > 64))
    assert stats.truncated == cut == int(np.sum(over)) > 0  # the rows over the line are drawn apart
    assert (f"<b>{cut}</b> longer than the maximum length 64: left out (listed with the bad rows)"
            in panel.summary_label.text())  # instruction rows: dropped by default, and said so
    assert panel.histogram.max_line.label.format == f"max length 64: {cut} longer, left out"


def test_a_validation_fraction_holds_out_that_share(window):
    panel = window.data_panel
    window.show_panel(panel)
    wait_until(lambda: settled(panel), 60, "the demo to be analysed")
    panel.split_combo.setCurrentIndex(panel.split_combo.findData("fraction"))
    panel.fraction_spin.setValue(0.2)
    wait_until(lambda: settled(panel) and panel.analysis.spec.val_fraction == 0.2, 60, "the split")
    prepared = panel.analysis.prepared
    assert (len(prepared.train), len(prepared.val)) == (240, 60)
    assert panel.spec().val_path is None


@pytest.mark.parametrize("tab", ["data", "train"])
def test_screenshot_of_a_new_window_ready_to_train_the_demo(window, tmp_path, qtbot, tab):
    window.resize(*SIZE)
    window.show_panel(window.data_panel)
    wait_until(lambda: settled(window.data_panel), 60, "the demo to be analysed")
    window.show_panel(window.train_panel if tab == "train" else window.data_panel)
    qtbot.wait(100)
    path = target(tmp_path, f"{tab}-panel-demo.png")
    assert window.grab().save(str(path))
    assert QImage(str(path)).size().toTuple() == SIZE and distinct_colours(path) > 20


def test_a_narrow_data_tab_stacks_the_preview_under_the_settings_instead_of_cutting_it_off(window, qtbot):
    window.resize(*SIZE)  # both docks open: the tab area is ~520 px wide
    panel = window.data_panel
    window.show_panel(panel)
    wait_until(lambda: settled(panel), 60, "the demo to be analysed")  # no analysis left running at the end
    scroll = window.tabs.currentWidget()
    qtbot.waitUntil(lambda: panel.split.orientation() == Qt.Vertical)
    qtbot.waitUntil(lambda: not scroll.horizontalScrollBar().isVisible())
    assert panel.preview_split.height() >= STACKED_PREVIEW_HEIGHT and panel.width() <= scroll.viewport().width()

    window.tree_dock.hide()
    window.adapter_dock.hide()
    qtbot.waitUntil(lambda: panel.split.orientation() == Qt.Horizontal)
    assert not scroll.horizontalScrollBar().isVisible() and panel.width() >= SIDE_BY_SIDE_WIDTH


def test_a_long_text_document_is_summarised_as_its_windows(window, tmp_path, default_tokenizer):
    text = " ".join(["river stone cloud window lantern meadow"] * 120)
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    panel = window.data_panel
    window.show_panel(panel)
    window.train_panel.form.max_length.setValue(64)
    panel.open_file(path)
    wait_until(lambda: settled(panel) and panel.analysis.spec.train_path == str(path), 60, "the book to be read")
    prepared = panel.analysis.prepared
    tokens = len(default_tokenizer(text)["input_ids"]) + 1
    windows = -(-tokens // 64)
    assert prepared.examples == len(prepared.train) == windows > 1
    assert (f"<b>1</b> document → <b>{windows}</b> training windows, <b>{tokens:,}</b> tokens"
            in panel.summary_label.text())
    assert panel.overflow.combo.currentText() == "auto: split into windows" and panel.overflow.stride_spin.isVisible()
    assert panel.histogram.max_line.label.format == "max length 64: 1 longer, split into windows"
    assert f"→ {windows} windows" in panel.row_label.text()


def test_choosing_to_cut_prompts_keeps_long_rows_and_says_how_many(window, tmp_path):
    rows = [{"prompt": "Short question?", "response": "Yes."},
            {"prompt": "Summarise: " + "lantern meadow " * 120, "response": "Lights in a field."}]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    panel = window.data_panel
    window.show_panel(panel)
    window.train_panel.form.max_length.setValue(96)
    panel.open_file(path)
    wait_until(lambda: settled(panel) and panel.analysis.spec.train_path == str(path), 60, "the file to be read")
    assert len(panel.analysis.prepared.train) == 1
    summary = panel.summary_label.text()
    assert "<b>1</b> longer than the maximum length 96: left out (listed with the bad rows)" in summary
    assert [line.split(": ")[0] for line in shown_bad_rows(panel)] == ["long.jsonl, row 2"]
    assert [panel.overflow.combo.itemData(i) for i in range(panel.overflow.combo.count())] == [
        "auto", "drop", "truncate_left"] and not panel.overflow.stride_spin.isVisible()
    panel.overflow.combo.setCurrentIndex(panel.overflow.combo.findData("truncate_left"))
    wait_until(lambda: settled(panel) and panel.analysis.spec.overflow == "truncate_left", 60, "the re-analysis")
    prepared = panel.analysis.prepared
    assert len(prepared.train) == 2 and not prepared.bad_rows and panel.bad_rows_label.text() == "No bad rows"
    assert "<b>1</b> longer than the maximum length 96: prompts cut from the left" in panel.summary_label.text()


def test_thousands_of_bad_rows_are_a_model_the_list_view_reads_not_items(window, tmp_path):
    lines = ['{"prompt": "fine", "response": "ok"}'] + ['{"prompt": "no answer"}'] * 5000
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    panel = window.data_panel
    window.show_panel(panel)
    panel.open_file(path)
    wait_until(lambda: settled(panel) and panel.analysis.spec.train_path == str(path), 60, "the file to be read")
    model = panel.bad_rows_list.model()
    assert model is panel.bad_rows and model.rowCount() == 5000 == len(panel.analysis.prepared.bad_rows)
    assert panel.bad_rows_label.text() == "5,000 bad rows (left out of training)"
    assert model.index(4999).data() == "bad.jsonl, row 5001: no 'response' value"
    assert model.index(0).data(Qt.ToolTipRole) == f"{path}, row 2: no 'response' value"


def test_the_summary_says_how_many_steps_an_epoch_is_at_the_batch_size(window):
    panel = window.data_panel
    window.show_panel(panel)
    wait_until(lambda: settled(panel), 60, "the demo to be analysed")
    panel.set_batch(16, 2)
    assert "One epoch: <b>9</b> optimizer steps at batch 16 × 2 accumulated" in panel.summary_label.text()  # 300 rows
    panel.set_batch(7)
    assert "One epoch: <b>42</b> optimizer steps at batch 7." in panel.summary_label.text()


@pytest.mark.usefixtures(hub_cache.__name__)
def test_the_open_dialog_takes_a_hub_dataset_id(window):
    from PySide6.QtWidgets import QApplication, QFileDialog, QLineEdit

    panel = window.data_panel
    window.show_panel(panel)

    def type_id() -> None:
        dialog = next((w for w in QApplication.topLevelWidgets() if isinstance(w, QFileDialog) and w.isVisible()),
                      None)
        if dialog is None:
            QTimer.singleShot(50, type_id)  # not shown yet
            return
        dialog.findChild(QLineEdit, "fileNameEdit").setText("someone/sums@train")
        dialog.accept()

    QTimer.singleShot(50, type_id)
    panel.choose_file()
    assert panel.path_edit.text() == "someone/sums@train"
    wait_until(lambda: settled(panel) and panel.analysis.spec.train_path == "someone/sums@train", 60, "the hub data")
    assert panel.analysis.prepared.format == "instruction" and len(panel.analysis.prepared.train) == 6
    assert panel.row_label.text().startswith("someone/sums@train, line 1 · instruction")
