"""The data panel on real files and the real tokenizer: the demo preselected, bad rows with their row numbers, the
preview's loss highlighting against the core's preview, the length histogram and its max-length line."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QImage

from studio.core.data.dataset import DEMO_DIR, demo_spec, prepare, preview
from studio.ui.data_panel import LOSS_COLOURS, SIDE_BY_SIDE_WIDTH, STACKED_PREVIEW_HEIGHT
from tests.ui.test_screenshots import SIZE, distinct_colours, target
from tests.ui.tiny_run import collect_dead_windows, wait_until

pytestmark = pytest.mark.usefixtures(collect_dead_windows.__name__)


def settled(panel) -> bool:
    analysis = panel.analysis
    return (analysis is not None and not panel.jobs.is_busy() and not panel._refresh_timer.isActive()
            and analysis.spec == panel.spec() and (analysis.prepared is not None or analysis.error is not None))


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
    assert panel.bad_rows_label.text() == "No bad rows" and panel.bad_rows_list.count() == 0
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
    shown = [panel.bad_rows_list.item(i).text() for i in range(panel.bad_rows_list.count())]
    assert shown == ["questions.csv, row 3: has 1 fields, the header has 2",
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
    assert int(np.sum(heights)) == stats.count == 300
    assert panel.histogram.max_line.value() == 64 and window.adapter_panel.seq_spin.value() == 64
    cut = int(np.sum(np.asarray(stats.lengths) > 64))
    assert stats.truncated == cut > 0 and f"<b>{cut}</b> cut at the maximum length 64" in panel.summary_label.text()


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
