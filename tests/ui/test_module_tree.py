"""The module tree on the real default model: ticks, tri-state containers, rank overrides, filters, groups."""

from __future__ import annotations

import pytest
from PySide6.QtCore import QModelIndex, Qt
from PySide6.QtWidgets import QLineEdit

from studio.core.model.inventory import filter_names
from studio.core.model.plan import count
from studio.ui.module_tree import NAME, RANK

Q0 = "model.layers.0.self_attn.q_proj"


def shown_count(window) -> str:
    return window.adapter_panel.trainable_label.text()


def core_count(window) -> str:
    return f"{count(window.opened.tree, window.plan_state.plan).trainable:,}"


def check_state(window, name: str) -> Qt.CheckState:
    return Qt.CheckState(window.tree_panel.model.index_of(name).data(Qt.CheckStateRole))


def press_space_on(qtbot, window, name: str) -> None:
    """Tick or untick a row the way a keyboard user does: make it current, press Space."""
    view = window.tree_panel.view
    index = window.tree_panel.source_index(name)
    view.scrollTo(index)
    view.setCurrentIndex(index)
    qtbot.keyClick(view, Qt.Key_Space)


def visible_names(proxy, parent=None) -> set[str]:
    parent = parent or QModelIndex()
    names = set()
    for row in range(proxy.rowCount(parent)):
        index = proxy.index(row, NAME, parent)
        names.add(index.data(Qt.UserRole))
        names |= visible_names(proxy, index)
    return names


def test_ticking_a_module_sets_the_count_of_the_resulting_plan(qtbot, window):
    window.tree_panel.apply_preset("")  # start from nothing ticked
    assert window.plan_state.plan.targets == ()
    assert shown_count(window) == "—"

    press_space_on(qtbot, window, Q0)

    assert window.plan_state.plan.targets == (Q0,)
    expected = 8 * (576 + 576)  # rank 8: A is 8×576, B is 576×8
    assert count(window.opened.tree, window.plan_state.plan).trainable == expected
    assert shown_count(window) == f"{expected:,}"

    press_space_on(qtbot, window, "model.layers.3.mlp.down_proj")  # 1536 -> 576
    assert shown_count(window) == f"{expected + 8 * (1536 + 576):,}" == core_count(window)


def test_all_linear_preset_updates_the_count_in_the_same_event_loop_turn(window):
    window.tree_panel.preset_action("all-linear").trigger()  # no waiting, no event processing after it

    plan = window.plan_state.plan
    assert len(plan.targets) == 210
    assert shown_count(window) == core_count(window) == "2,442,240"
    assert window.tree_panel.summary.text().startswith("210 of 212 targetable modules selected")


def test_typing_a_rank_in_the_rank_cell_overrides_that_module(qtbot, window):
    window.tree_panel.apply_preset("all-linear")
    before = count(window.opened.tree, window.plan_state.plan).trainable
    view = window.tree_panel.view
    index = window.tree_panel.source_index(Q0, RANK)
    assert index.data() == "8"

    view.scrollTo(index)
    view.setCurrentIndex(index)
    view.edit(index)
    editor = view.viewport().findChild(QLineEdit)
    assert editor is not None
    editor.selectAll()
    qtbot.keyClicks(editor, "32")
    qtbot.keyClick(editor, Qt.Key_Return)  # Qt commits an editor's text on the next event-loop turn

    qtbot.waitUntil(lambda: window.plan_state.plan.rank_overrides == {Q0: 32}, timeout=2000)
    assert index.data() == "32"
    assert shown_count(window) == f"{before + (32 - 8) * (576 + 576):,}" == core_count(window)

    window.tree_panel.model.setData(window.tree_panel.model.index_of(Q0, RANK), "")  # empty: the global rank
    assert window.plan_state.plan.rank_overrides == {}
    assert shown_count(window) == f"{before:,}"


def test_checking_a_container_ticks_its_layers_and_shows_partial_above(qtbot, window):
    window.tree_panel.apply_preset("")
    attention = "model.layers.0.self_attn"
    press_space_on(qtbot, window, attention)

    projections = [f"{attention}.{p}_proj" for p in "qkvo"]
    assert set(window.plan_state.plan.targets) == set(projections)
    assert check_state(window, attention) == Qt.Checked
    assert all(check_state(window, p) == Qt.Checked for p in projections)
    assert check_state(window, "model.layers.0") == Qt.PartiallyChecked
    assert check_state(window, "model.layers") == Qt.PartiallyChecked
    assert check_state(window, "model.layers.1") == Qt.Unchecked

    press_space_on(qtbot, window, projections[0])  # untick one: the block turns partial
    assert check_state(window, attention) == Qt.PartiallyChecked

    press_space_on(qtbot, window, attention)  # partial + click: everything inside it
    assert check_state(window, attention) == Qt.Checked
    press_space_on(qtbot, window, "model.layers.0.mlp")
    assert check_state(window, "model.layers.0") == Qt.Checked
    assert len(window.plan_state.plan.targets) == 7


@pytest.mark.parametrize("name", ["model.norm", "model.layers.0.input_layernorm", "model.rotary_emb"])
def test_untargetable_rows_are_not_checkable_and_say_why(window, name):
    model = window.tree_panel.model
    index = model.index_of(name)
    info = window.opened.tree[name]
    assert not info.targetable
    assert not model.flags(index) & Qt.ItemIsUserCheckable
    assert index.data(Qt.CheckStateRole) is None
    assert info.why_not and info.why_not in index.data(Qt.ToolTipRole)
    assert not model.setData(index, Qt.Checked, Qt.CheckStateRole)
    assert index.data(Qt.ForegroundRole).color().name() == "#808080"


@pytest.mark.parametrize("text", ["q_proj", "model.layers.1*.mlp.*", r"re:.*\.2\.self_attn\.(k|v)_proj"])
def test_filter_shows_only_matches_and_their_parents(qtbot, window, text):
    qtbot.keyClicks(window.tree_panel.filter_box, text)

    matches = set(filter_names(window.opened.tree, text))
    parents = {m.rsplit(".", i)[0] for m in matches for i in range(1, m.count(".") + 1)}
    assert matches
    assert visible_names(window.tree_panel.proxy) == matches | parents

    window.tree_panel.filter_box.clear()
    assert len(visible_names(window.tree_panel.proxy)) == len(window.opened.tree.modules) - 1


def test_group_action_ticks_a_projection_in_every_layer(window):
    window.tree_panel.apply_preset("")
    menu = window.tree_panel.context_menu("model.layers.4.self_attn.v_proj", window.opened.tree)
    select = next(a for a in menu.actions() if a.text().startswith("Select self_attn.v_proj in all"))
    assert select.text() == "Select self_attn.v_proj in all 30 blocks"

    select.trigger()
    assert window.plan_state.plan.targets == tuple(f"model.layers.{i}.self_attn.v_proj" for i in range(30))
    assert shown_count(window) == f"{30 * 8 * (576 + 192):,}" == core_count(window)

    clear = next(a for a in menu.actions() if a.text().startswith("Clear self_attn.v_proj"))
    clear.trigger()
    assert window.plan_state.plan.targets == ()


def test_a_narrow_dock_hides_type_then_shape_and_keeps_the_name_readable(qtbot, window):
    from studio.ui.module_tree import SHAPE, TYPE
    from studio.ui.module_tree_panel import NAME_MIN_WIDTH

    view = window.tree_panel.view
    window.resizeDocks([window.tree_dock], [300], Qt.Horizontal)
    qtbot.waitUntil(lambda: view.isColumnHidden(TYPE) and view.isColumnHidden(SHAPE))
    assert view.columnWidth(NAME) >= NAME_MIN_WIDTH - 20  # the scroll bar may take a few pixels of it
    tooltip = window.tree_panel.model.index_of(Q0).data(Qt.ToolTipRole)
    assert tooltip.startswith(f"{Q0}  (Linear · 576→576)")

    window.resizeDocks([window.tree_dock], [900], Qt.Horizontal)
    qtbot.waitUntil(lambda: not view.isColumnHidden(TYPE) and not view.isColumnHidden(SHAPE))
    assert view.columnWidth(NAME) >= NAME_MIN_WIDTH


def test_the_header_menu_hides_a_column_the_user_does_not_want(window):
    from studio.ui.module_tree import PARAMS

    window.resizeDocks([window.tree_dock], [900], Qt.Horizontal)
    menu = window.tree_panel.columns_menu()
    params = next(a for a in menu.actions() if a.text() == "Parameters")
    params.setChecked(False)
    assert window.tree_panel.view.isColumnHidden(PARAMS)
    window.tree_panel.columns_menu().actions()[2].setChecked(True)  # the third entry is Parameters again
    assert not window.tree_panel.view.isColumnHidden(PARAMS)
