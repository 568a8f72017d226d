"""The adapter panel: rank, alpha, dropout, variant, init, bias and QLoRA, with the plan's exact numbers.

Every change recomputes the numbers synchronously, in the same event-loop turn: the core's `count` and
`estimate` are pure arithmetic on the module tree (milliseconds even on a 70B tree), so there is nothing to
debounce or push to a thread. An invalid plan shows the core's PlanError line here, in a warning colour.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from PySide6.QtCore import Qt, Slot
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from studio.core.errors import PlanError
from studio.core.model.memory import Fit, MemoryEstimate, estimate, judge
from studio.core.model.plan import LoraPlan, PlanCounts, count, validate
from studio.core.units import human_bytes
from studio.ui.memory_bar import MemoryBar
from studio.ui.model_loader import Machine
from studio.ui.plan_state import PlanState

MAX_SLIDER_POWER = 9  # the rank slider runs over 1, 2, 4 ... 512
VARIANTS = (("LoRA", "lora"), ("rsLoRA", "rslora"), ("DoRA", "dora"))
INITS = (("default (B = 0)", "default"), ("gaussian", "gaussian"), ("PiSSA", "pissa"), ("OLoRA", "olora"))
BIASES = (("none", "none"), ("all", "all"), ("LoRA layers only", "lora_only"))
VERDICT_TEXT = {"fits": "Fits", "tight": "Tight", "will-not-fit": "Will not fit", "unknown": "No GPU"}
VERDICT_COLOUR = {"fits": "#2e7d32", "tight": "#b26a00", "will-not-fit": "#c62828", "unknown": "#666666"}
WARNING_STYLE = "color: #b3261e; font-weight: bold;"
NO_CUDA_REASON = "QLoRA loads the base in 4-bit through bitsandbytes, which needs a CUDA GPU; this machine has none"


@dataclass(frozen=True)
class MemorySettings:
    """What the memory estimate assumes about the run (the train panel will own these later)."""

    batch_size: int = 1
    seq_len: int = 512
    gradient_checkpointing: bool = False
    quantization: str | None = None  # "4bit" with QLoRA
    gpus: int = 1  # the estimate is then each GPU's
    sharded: bool = False  # the base sharded across the GPUs (FSDP)


@dataclass(frozen=True)
class PlanNumbers:
    """What the panel shows for the current plan; `error` is the PlanError line when it is invalid."""

    counts: PlanCounts | None
    estimate: MemoryEstimate | None
    fit: Fit | None
    error: str = ""


def peft_help(field: str) -> str:
    """PEFT's own help for a LoraConfig field, as a word-wrapped rich-text tooltip."""
    from peft import LoraConfig

    text = str(LoraConfig.__dataclass_fields__[field].metadata.get("help", ""))
    text = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text)  # markdown links -> their words
    text = re.sub(r"<[^>]+>", "", text)
    return f"<p><b>{field}</b>: {text}</p>"


def _power_slider(maximum_power: int) -> QSlider:
    slider = QSlider(Qt.Horizontal)
    slider.setRange(0, maximum_power)
    slider.setPageStep(1)
    slider.setTickPosition(QSlider.TicksBelow)
    slider.setTickInterval(1)
    return slider


class AdapterPanel(QWidget):
    def __init__(self, state: PlanState, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._state = state
        self._machine = Machine(None, None)
        self._memory = MemorySettings()
        self.numbers = PlanNumbers(None, None, None)
        self._build()
        self._show_plan_settings(state.plan)
        self.refresh()
        state.sig_plan_changed.connect(self._on_state_plan_changed)

    # ---- layout -------------------------------------------------------------------------------------------

    def _build(self) -> None:
        self.rank_slider = _power_slider(MAX_SLIDER_POWER)
        self.rank_spin = QSpinBox()
        self.rank_spin.setRange(1, 4096)
        self.alpha_slider = _power_slider(MAX_SLIDER_POWER + 1)
        self.alpha_spin = QDoubleSpinBox()
        self.alpha_spin.setRange(0.1, 100000.0)
        self.alpha_spin.setDecimals(1)
        self.alpha_lock = QCheckBox("α = 2·r")
        self.alpha_lock.setChecked(True)
        self.alpha_lock.setToolTip("Keep lora_alpha at twice the rank, the usual starting point")
        self.scaling_label = QLabel()
        self.dropout_spin = QDoubleSpinBox()
        self.dropout_spin.setRange(0.0, 0.95)
        self.dropout_spin.setSingleStep(0.05)
        self.dropout_spin.setDecimals(2)
        self.variant_combo, self.init_combo, self.bias_combo = (self._combo(i) for i in (VARIANTS, INITS, BIASES))
        self.qlora_check = QCheckBox("Load the base in 4-bit (QLoRA)")
        self.qlora_check.setEnabled(False)
        self.qlora_check.setToolTip(NO_CUDA_REASON)

        form = QFormLayout()
        form.addRow("Rank r", self._pair(self.rank_slider, self.rank_spin))
        form.addRow("Alpha α", self._pair(self.alpha_slider, self.alpha_spin, self.alpha_lock))
        form.addRow("Scaling", self.scaling_label)
        form.addRow("Dropout", self.dropout_spin)
        form.addRow("Variant", self.variant_combo)
        form.addRow("Init", self.init_combo)
        form.addRow("Bias", self.bias_combo)
        form.addRow("", self.qlora_check)
        adapter_box = QGroupBox("LoRA settings")
        adapter_box.setLayout(form)

        self.trainable_label, self.share_label, self.size_label, self.modules_label = (QLabel() for _ in range(4))
        for label in (self.trainable_label, self.share_label, self.size_label, self.modules_label):
            label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        bold = self.trainable_label.font()
        bold.setBold(True)
        bold.setPointSizeF(bold.pointSizeF() * 1.25)
        self.trainable_label.setFont(bold)
        numbers = QFormLayout()
        numbers.addRow("Trainable parameters", self.trainable_label)
        numbers.addRow("Share of the model", self.share_label)
        numbers.addRow("Adapter file", self.size_label)
        numbers.addRow("Adapted modules", self.modules_label)
        self.error_label = QLabel()
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet(WARNING_STYLE)
        self.error_label.hide()
        numbers_box = QGroupBox("Size (exact, as PEFT counts)")
        numbers_layout = QVBoxLayout(numbers_box)
        numbers_layout.addLayout(numbers)
        numbers_layout.addWidget(self.error_label)

        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 1024)
        self.batch_spin.setValue(self._memory.batch_size)
        self.seq_spin = QSpinBox()
        self.seq_spin.setRange(16, 131072)
        self.seq_spin.setSingleStep(256)
        self.seq_spin.setValue(self._memory.seq_len)
        self.checkpointing_check = QCheckBox("checkpointing")
        self.checkpointing_check.setToolTip("Gradient checkpointing: recompute activations in backward")
        self.memory_bar = MemoryBar()
        self.verdict_label = QLabel()
        self.advice_label = QLabel()
        self.advice_label.setWordWrap(True)
        memory_box = QGroupBox("GPU memory (estimate)")
        memory_layout = QVBoxLayout(memory_box)
        shape_row = QHBoxLayout()
        for widget in (QLabel("batch"), self.batch_spin, QLabel("× tokens"), self.seq_spin, self.checkpointing_check):
            shape_row.addWidget(widget)
        shape_row.addStretch(1)
        memory_layout.addLayout(shape_row)
        for widget in (self.memory_bar, self.verdict_label, self.advice_label):
            memory_layout.addWidget(widget)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        for box in (adapter_box, numbers_box, memory_box):
            layout.addWidget(box)
        layout.addStretch(1)
        self._connect_controls()

    def _combo(self, items: tuple[tuple[str, str], ...]) -> QComboBox:
        combo = QComboBox()
        for label, value in items:
            combo.addItem(label, value)
        return combo

    def _pair(self, *widgets: QWidget) -> QWidget:
        row = QWidget()
        layout = QHBoxLayout(row)
        layout.setContentsMargins(0, 0, 0, 0)
        for n, widget in enumerate(widgets):
            layout.addWidget(widget, 1 if n == 0 else 0)
        return row

    def _connect_controls(self) -> None:
        self.rank_slider.valueChanged.connect(self._on_rank_slider_value_changed)
        self.rank_spin.valueChanged.connect(self._on_rank_spin_value_changed)
        self.alpha_slider.valueChanged.connect(self._on_alpha_slider_value_changed)
        self.alpha_spin.valueChanged.connect(self._on_alpha_spin_value_changed)
        self.alpha_lock.toggled.connect(self._on_alpha_lock_toggled)
        self.dropout_spin.valueChanged.connect(self._on_dropout_spin_value_changed)
        for combo in (self.variant_combo, self.init_combo, self.bias_combo):
            combo.currentIndexChanged.connect(self._on_combo_index_changed)
        self.qlora_check.toggled.connect(lambda on: self.set_memory_settings(quantization="4bit" if on else None))
        self.batch_spin.valueChanged.connect(lambda v: self.set_memory_settings(batch_size=int(v)))
        self.seq_spin.valueChanged.connect(lambda v: self.set_memory_settings(seq_len=int(v)))
        self.checkpointing_check.toggled.connect(lambda on: self.set_memory_settings(gradient_checkpointing=on))

    # ---- public -------------------------------------------------------------------------------------------

    @property
    def memory_settings(self) -> MemorySettings:
        return self._memory

    def set_memory_settings(self, **changes: object) -> None:
        self._memory = replace(self._memory, **changes)  # type: ignore[arg-type]
        self.refresh()

    def set_machine(self, machine: Machine) -> None:
        """Called once a model is open; peft is imported by then, so its help text becomes the tooltips."""
        self._machine = machine
        self.qlora_check.setEnabled(machine.has_cuda)
        self.qlora_check.setToolTip(
            "Load the frozen base weights in 4-bit NF4 (bitsandbytes); the adapter trains in full precision"
            if machine.has_cuda else NO_CUDA_REASON
        )
        if not machine.has_cuda:
            self.qlora_check.setChecked(False)
        for widget, fields in (
            (self.rank_spin, ("r",)), (self.rank_slider, ("r",)), (self.alpha_spin, ("lora_alpha",)),
            (self.alpha_slider, ("lora_alpha",)), (self.dropout_spin, ("lora_dropout",)),
            (self.variant_combo, ("use_rslora", "use_dora")), (self.init_combo, ("init_lora_weights",)),
            (self.bias_combo, ("bias",)),
        ):
            widget.setToolTip("".join(peft_help(f) for f in fields))
        self.refresh()

    def refresh(self) -> None:
        """Recompute and show the numbers for the current plan (synchronously)."""
        tree, plan = self._state.tree, self._state.plan
        self.numbers = self._compute(plan)
        counts, fit, est = self.numbers.counts, self.numbers.fit, self.numbers.estimate
        self.error_label.setText(self.numbers.error)
        self.error_label.setVisible(bool(self.numbers.error))
        if counts is None or tree is None:
            for label in (self.trainable_label, self.share_label, self.size_label, self.modules_label):
                label.setText("—")
            self.memory_bar.set_estimate(None, None)
            self.verdict_label.setText("Open a model to see the numbers" if tree is None else "")
            self.verdict_label.setStyleSheet("")
            self.advice_label.hide()
            return
        self.trainable_label.setText(f"{counts.trainable:,}")
        self.share_label.setText(f"{100 * counts.share:.3g} % of {counts.total:,}")
        self.size_label.setText(human_bytes(counts.adapter_bytes))
        self.size_label.setToolTip(f"{counts.adapter_bytes:,} bytes of adapter_model.safetensors")
        self.modules_label.setText(f"{counts.modules}")
        assert est is not None and fit is not None
        self.memory_bar.set_estimate(est, self._machine.gpu_bytes)
        where = f" of {human_bytes(self._machine.gpu_bytes)}" if self._machine.gpu_bytes else " for a CUDA run"
        m = self._memory
        if m.gpus > 1:
            where += f" on each of {m.gpus} GPUs" + (", the base sharded (FSDP)" if m.sharded else "")
        self.verdict_label.setText(f"{VERDICT_TEXT[fit.verdict]}: needs ~{human_bytes(est.total)}{where}")
        self.verdict_label.setStyleSheet(f"color: {VERDICT_COLOUR[fit.verdict]}; font-weight: bold;")
        self.advice_label.setText(fit.advice[:1].upper() + fit.advice[1:])
        self.advice_label.setVisible(bool(fit.advice))

    # ---- reactions ----------------------------------------------------------------------------------------

    def _compute(self, plan: LoraPlan) -> PlanNumbers:
        tree = self._state.tree
        if tree is None:
            return PlanNumbers(None, None, None)
        try:
            validate(tree, plan)
        except PlanError as exc:
            return PlanNumbers(None, None, None, str(exc))
        m = self._memory
        counts = count(tree, plan)
        est = estimate(tree, plan, counts, batch_size=m.batch_size, seq_len=m.seq_len, quantization=m.quantization,
                       gradient_checkpointing=m.gradient_checkpointing, gpus=m.gpus, sharded=m.sharded)
        fit = judge(est, self._machine.gpu_bytes, gradient_checkpointing=m.gradient_checkpointing,
                    quantization=m.quantization, batch_size=m.batch_size)
        return PlanNumbers(counts, est, fit)

    @Slot(object)
    def _on_state_plan_changed(self, plan: LoraPlan) -> None:
        self._show_plan_settings(plan)
        self.refresh()

    def _show_plan_settings(self, plan: LoraPlan) -> None:
        """Put the plan's values into the controls without echoing them back as changes."""
        values = (
            (self.rank_spin, plan.rank), (self.rank_slider, round(math.log2(max(plan.rank, 1)))),
            (self.alpha_spin, plan.alpha), (self.alpha_slider, round(math.log2(max(plan.alpha, 1)))),
            (self.dropout_spin, plan.dropout),
        )
        for widget, value in values:
            widget.blockSignals(True)
            widget.setValue(value)
            widget.blockSignals(False)
        for combo, value in ((self.variant_combo, plan.variant), (self.init_combo, plan.init),
                             (self.bias_combo, plan.bias)):
            combo.blockSignals(True)
            combo.setCurrentIndex(combo.findData(value))
            combo.blockSignals(False)
        self.alpha_slider.setEnabled(not self.alpha_lock.isChecked())
        self.alpha_spin.setEnabled(not self.alpha_lock.isChecked())
        word = "α/√r" if plan.variant == "rslora" else "α/r"
        self.scaling_label.setText(f"{word} = {plan.scaling_of(''):.3g}")

    @Slot(int)
    def _on_rank_slider_value_changed(self, power: int) -> None:
        self.rank_spin.setValue(2**power)  # the spin box's change updates the plan

    @Slot(int)
    def _on_rank_spin_value_changed(self, rank: int) -> None:
        changes: dict[str, object] = {"rank": int(rank)}
        if self.alpha_lock.isChecked():
            changes["alpha"] = 2.0 * rank
        self._state.update(**changes)

    @Slot(int)
    def _on_alpha_slider_value_changed(self, power: int) -> None:
        self.alpha_spin.setValue(float(2**power))

    @Slot(float)
    def _on_alpha_spin_value_changed(self, alpha: float) -> None:
        self._state.update(alpha=float(alpha))

    @Slot(float)
    def _on_dropout_spin_value_changed(self, dropout: float) -> None:
        self._state.update(dropout=round(float(dropout), 4))

    @Slot(int)
    def _on_combo_index_changed(self, _index: int) -> None:
        self._state.update(
            variant=self.variant_combo.currentData(), init=self.init_combo.currentData(),
            bias=self.bias_combo.currentData(),
        )

    @Slot(bool)
    def _on_alpha_lock_toggled(self, locked: bool) -> None:
        if locked:
            self._state.update(alpha=2.0 * self._state.plan.rank)
        self._show_plan_settings(self._state.plan)
