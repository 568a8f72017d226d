"""The adapter panel's controls and live numbers, checked against the core and against PEFT itself."""

from __future__ import annotations

import sys

import torch
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QMessageBox

from studio.core.errors import PlanError
from studio.core.model.memory import estimate
from studio.core.model.plan import count, to_peft_config, validate

Q0 = "model.layers.0.self_attn.q_proj"


def shown(window) -> int:
    return int(window.adapter_panel.trainable_label.text().replace(",", ""))


def test_displayed_count_equals_peft_for_a_hand_made_dora_plan(qtbot, window, fresh_default_model):
    from peft import get_peft_model

    panel, model = window.adapter_panel, window.tree_panel.model
    window.tree_panel.apply_preset("")
    model.setData(model.index_of("model.layers.1.mlp"), Qt.Checked, Qt.CheckStateRole)  # a container
    model.setData(model.index_of(Q0), Qt.Checked, Qt.CheckStateRole)
    model.setData(model.index_of(Q0, 4), "16")
    panel.variant_combo.setCurrentIndex(panel.variant_combo.findData("dora"))
    panel.bias_combo.setCurrentIndex(panel.bias_combo.findData("all"))

    plan = window.plan_state.plan
    assert (plan.variant, plan.bias, plan.rank_overrides, len(plan.targets)) == ("dora", "all", {Q0: 16}, 4)
    peft_model = get_peft_model(fresh_default_model.model, to_peft_config(plan, window.opened.tree))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert shown(window) == trainable
    assert panel.share_label.text() == f"{100 * trainable / total:.3g} % of {total:,}"


def test_rank_slider_moves_the_rank_alpha_and_count(qtbot, window):
    panel = window.adapter_panel
    window.tree_panel.apply_preset("all-linear")
    assert panel.rank_slider.value() == 3 and shown(window) == 2_442_240  # rank 8

    panel.rank_slider.setFocus()
    qtbot.keyClick(panel.rank_slider, Qt.Key_Right)  # 8 -> 16
    qtbot.keyClick(panel.rank_slider, Qt.Key_Right)  # 16 -> 32

    plan = window.plan_state.plan
    assert (plan.rank, plan.alpha) == (32, 64.0)  # alpha = 2·r while locked
    assert panel.rank_spin.value() == 32
    assert shown(window) == 4 * 2_442_240 == count(window.opened.tree, plan).trainable
    assert panel.scaling_label.text() == "α/r = 2"

    panel.alpha_lock.setChecked(False)
    panel.alpha_spin.setValue(8.0)
    assert window.plan_state.plan.alpha == 8.0 and panel.scaling_label.text() == "α/r = 0.25"


def test_one_rank_slider_move_counts_the_plan_once(qtbot, window):
    panel = window.adapter_panel
    window.tree_panel.apply_preset("all-linear")
    counted: list[object] = []

    def profile(frame, event, _arg) -> None:  # sees every call of plan.count, whoever imported it
        if event == "call" and frame.f_code is count.__code__:
            counted.append(frame.f_back.f_code.co_name if frame.f_back else None)

    panel.rank_slider.setFocus()
    sys.setprofile(profile)
    try:
        qtbot.keyClick(panel.rank_slider, Qt.Key_Right)  # 8 -> 16
    finally:
        sys.setprofile(None)
    assert window.plan_state.plan.rank == 16 and shown(window) == 2 * 2_442_240
    assert counted == ["_compute"]  # the panel's count, handed to the memory estimate


def test_rank_spin_box_takes_ranks_between_the_powers_of_two(window):
    panel = window.adapter_panel
    window.tree_panel.apply_preset("attention")
    panel.rank_spin.setValue(12)
    assert window.plan_state.plan.rank == 12
    assert panel.rank_slider.value() == 4  # the nearest power: 16
    assert shown(window) == count(window.opened.tree, window.plan_state.plan).trainable


def test_a_rank_larger_than_a_layer_shows_the_plan_error_in_the_panel(window):
    panel = window.adapter_panel
    window.tree_panel.apply_preset("attention")
    panel.rank_spin.setValue(256)  # k_proj and v_proj are 576→192

    with_error = window.plan_state.plan
    try:
        validate(window.opened.tree, with_error)
    except PlanError as exc:
        expected = str(exc)
    assert "rank 256 is larger than" in expected
    assert panel.error_label.isVisibleTo(panel) and panel.error_label.text() == expected
    assert panel.trainable_label.text() == "—"
    assert window.findChildren(QMessageBox) == []  # inline, not a dialog

    panel.rank_spin.setValue(64)
    assert not panel.error_label.isVisibleTo(panel)
    assert shown(window) == count(window.opened.tree, window.plan_state.plan).trainable


def test_memory_bar_and_verdict_follow_the_estimate(window):
    panel = window.adapter_panel
    window.tree_panel.apply_preset("all-linear")
    panel.seq_spin.setValue(2048)
    panel.batch_spin.setValue(4)

    tree, plan = window.opened.tree, window.plan_state.plan
    expected = estimate(tree, plan, count(tree, plan), batch_size=4, seq_len=2048)
    assert panel.memory_bar.parts == expected.parts()
    assert panel.numbers.estimate == expected
    if torch.cuda.is_available():
        assert panel.numbers.fit.verdict in ("fits", "tight", "will-not-fit")
    else:
        assert panel.numbers.fit.verdict == "unknown"
        assert panel.verdict_label.text().startswith("No GPU: needs ~")
        assert panel.advice_label.text() == "No GPU found: the estimate is for a CUDA run"

    panel.checkpointing_check.setChecked(True)
    assert panel.numbers.estimate.activations < expected.activations


def test_qlora_toggle_is_only_offered_with_cuda(window):
    check = window.adapter_panel.qlora_check
    if torch.cuda.is_available():
        assert check.isEnabled()
        check.setChecked(True)
        assert window.adapter_panel.memory_settings.quantization == "4bit"
    else:
        assert not check.isEnabled()
        assert "needs a CUDA GPU" in check.toolTip()


def test_tooltips_reuse_peft_help(window):
    from peft import LoraConfig

    help_r = LoraConfig.__dataclass_fields__["r"].metadata["help"]
    assert help_r in window.adapter_panel.rank_spin.toolTip()
    assert "magnitude and direction" in window.adapter_panel.variant_combo.toolTip()  # use_dora's help
