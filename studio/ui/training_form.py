"""The hyperparameters of a run as a form: it reads and writes the core's `TrainingConfig` (plus the data's
maximum length, which the data panel shows against its length histogram). A run's length is given in optimizer
steps or in epochs; once it knows how many training examples the data makes (`set_train_examples`), the form
shows what the one means in the other, and in epochs mode `max_steps` holds the steps they come to."""

from __future__ import annotations

import math
from dataclasses import fields

from PySide6.QtCore import Signal
from PySide6.QtGui import QValidator
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QSpinBox,
    QWidget,
)

from studio.core.data.epochs import steps_for_epochs, steps_per_epoch
from studio.core.data.spec import DataSpec
from studio.core.runconfig import DEMO_TRAINING, TrainingConfig, field_help

SCHEDULES = ("cosine", "linear", "constant")
DEFAULT_MAX_LENGTH = 128
FIELD_WIDTH = 115  # numbers are short; a narrow form leaves the width to the plots
PAIRS_PER_ROW = 2
FORM_DEFAULTS = DEMO_TRAINING  # a run that shows a curve in minutes


class LearningRateSpinBox(QDoubleSpinBox):
    """Shows 2e-04 rather than 0.000200; the arrows halve and double the rate, the usual way to search it."""

    def __init__(self) -> None:
        super().__init__()
        self.setDecimals(12)
        self.setRange(1e-9, 1e6)  # wide enough to show any run file's rate, a diverging one included

    def textFromValue(self, value: float) -> str:  # noqa: N802 - Qt's name
        return f"{value:.3g}"

    def valueFromText(self, text: str) -> float:  # noqa: N802
        try:
            return float(text)
        except ValueError:
            return self.value()

    def validate(self, text: str, pos: int) -> object:
        try:
            value = float(text)
        except ValueError:
            return QValidator.Intermediate, text, pos
        ok = math.isfinite(value) and self.minimum() <= value <= self.maximum()
        return (QValidator.Acceptable if ok else QValidator.Intermediate), text, pos

    def stepBy(self, steps: int) -> None:  # noqa: N802
        self.setValue(self.value() * 2.0**steps)


def _tip(name: str) -> str:
    """The tooltip of a TrainingConfig field: its own help."""
    return field_help(TrainingConfig, name)


def _spin(low: int, high: int, tip: str, special: str | None = None) -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(low, high)
    spin.setToolTip(tip)
    if special:
        spin.setSpecialValueText(special)  # shown at the minimum, e.g. "off" for 0
    return spin


class TrainingForm(QWidget):
    sig_changed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.learning_rate = LearningRateSpinBox()
        self.learning_rate.setToolTip(_tip("learning_rate"))
        self.max_steps = _spin(1, 10_000_000, _tip("max_steps"))
        self.epochs = QDoubleSpinBox()
        self.epochs.setRange(0.01, 100_000.0)
        self.epochs.setDecimals(2)
        self.epochs.setValue(1.0)
        self.epochs.setToolTip(_tip("epochs"))
        self.length_unit = QComboBox()
        self.length_unit.addItem("steps", "steps")
        self.length_unit.addItem("epochs", "epochs")
        self.length_unit.setToolTip("Give the run's length in optimizer steps or in passes over the data")
        self.length_hint = QLabel()  # what the length means in the other unit, once the data is known
        self._train_examples: int | None = None
        self.batch_size = _spin(1, 4096, _tip("batch_size"))
        self.gradient_accumulation = _spin(1, 1024, _tip("gradient_accumulation"))
        self.warmup = QDoubleSpinBox()
        self.warmup.setRange(0.0, 0.95)
        self.warmup.setSingleStep(0.05)
        self.warmup.setToolTip(_tip("warmup_ratio"))
        self.schedule = QComboBox()
        self.schedule.addItems(SCHEDULES)
        self.schedule.setToolTip(_tip("schedule"))
        self.eval_every = _spin(0, 10_000_000, _tip("eval_every"), "end only")
        self.eval_examples = _spin(0, 100_000, _tip("eval_examples"), "loss only")
        self.save_every = _spin(0, 10_000_000, _tip("save_every"), "off")
        self.spectrum_every = _spin(0, 10_000_000, _tip("spectrum_every"), "off")
        self.max_length = _spin(2, 1_000_000, field_help(DataSpec, "max_length"))  # DataSpec's field
        self.gradient_checkpointing = QCheckBox("on")
        self.gradient_checkpointing.setToolTip(_tip("gradient_checkpointing"))
        self.seed = _spin(0, 2**31 - 1, _tip("seed"))
        # shown only on a machine with several GPUs: the run then trains on one process per GPU (accelerate)
        self.gpus = _spin(1, 1, "GPUs to train on, one process each: every step's batch is split between them "
                                "(Batch size is per GPU)")
        self.gpus_label = QLabel("GPUs")
        self.shard = QCheckBox("Shard the base (FSDP)")
        self.shard.setToolTip(
            "Each GPU keeps only its slice of the base's weights (and of the adapter and its optimizer state), "
            "gathering a layer's whole weights while it runs. It pays when the base does not fit one GPU; on a "
            "model that does, it is slower than one whole copy per GPU. Needs 2 GPUs or more.")

        length = QWidget()  # steps or epochs, the unit, and what that is in the other unit
        length_row = QHBoxLayout(length)
        length_row.setContentsMargins(0, 0, 0, 0)
        for widget in (self.max_steps, self.epochs, self.length_unit, self.length_hint):
            length_row.addWidget(widget)
        grid = QGridLayout(self)  # label/field pairs, PAIRS_PER_ROW to a row: short, so the plots keep the height
        grid.setContentsMargins(0, 0, 0, 0)
        grid.addWidget(QLabel("Train for"), 0, 0)
        grid.addWidget(length, 0, 1, 1, 2 * PAIRS_PER_ROW - 1)
        for widget in (self.max_steps, self.epochs, self.length_unit):
            widget.setMaximumWidth(FIELD_WIDTH)
        for i, (label, widget) in enumerate((
            ("Learning rate", self.learning_rate), ("Batch size", self.batch_size),
            ("Grad accumulation", self.gradient_accumulation), ("Warmup share", self.warmup),
            ("Schedule", self.schedule), ("Max length", self.max_length), ("Evaluate every", self.eval_every),
            ("Scored examples", self.eval_examples), ("Save every", self.save_every),
            ("Spectrum every", self.spectrum_every), ("Checkpointing", self.gradient_checkpointing),
            ("Seed", self.seed),
        )):
            row, pair = divmod(i, PAIRS_PER_ROW)
            row += 1  # under the run's length
            widget.setMaximumWidth(FIELD_WIDTH)
            grid.addWidget(QLabel(label), row, 2 * pair)
            grid.addWidget(widget, row, 2 * pair + 1)
        self.gpus.setMaximumWidth(FIELD_WIDTH)
        grid.addWidget(self.gpus_label, row + 1, 0)
        grid.addWidget(self.gpus, row + 1, 1)
        grid.addWidget(self.shard, row + 1, 2, 1, 2)
        self.set_gpu_count(0)
        grid.setColumnStretch(2 * PAIRS_PER_ROW, 1)
        self.set_training_config(FORM_DEFAULTS)
        self.max_length.setValue(DEFAULT_MAX_LENGTH)
        for spin in (self.learning_rate, self.max_steps, self.batch_size, self.gradient_accumulation, self.warmup,
                     self.eval_every, self.eval_examples, self.save_every, self.spectrum_every, self.max_length,
                     self.seed):
            spin.valueChanged.connect(self.sig_changed)
        self.schedule.currentIndexChanged.connect(self.sig_changed)
        self.gradient_checkpointing.toggled.connect(self.sig_changed)
        self.gpus.valueChanged.connect(self._update_shard)
        self.epochs.valueChanged.connect(self.sig_changed)
        self.length_unit.currentIndexChanged.connect(self.sig_changed)
        for widget in (self.epochs, self.length_unit, self.batch_size, self.gradient_accumulation, self.max_steps):
            signal = widget.currentIndexChanged if widget is self.length_unit else widget.valueChanged
            signal.connect(self._update_length)
        self._update_length()

    def set_gpu_count(self, count: int) -> None:
        """The machine's CUDA GPUs: with two or more the form offers how many a run trains on (all by default)."""
        several = count > 1
        self.gpus.setRange(1, max(1, count))
        if several:
            self.gpus.setValue(count)
        self.gpus.setVisible(several)
        self.gpus_label.setVisible(several)
        self.shard.setVisible(several)
        self._update_shard()

    def processes(self) -> int:
        """The processes a run started from the form trains on: one per chosen GPU (1 on a machine with one)."""
        return self.gpus.value() if self.gpus.maximum() > 1 else 1

    def sharded(self) -> bool:
        """Whether a run started from the form shards its base across its GPUs (FSDP)."""
        return self.shard.isChecked() and self.processes() > 1

    def _update_shard(self) -> None:
        self.shard.setEnabled(self.processes() > 1)  # one GPU has nothing to share the weights with

    def in_epochs(self) -> bool:
        return self.length_unit.currentData() == "epochs"

    def set_train_examples(self, count: int | None) -> None:
        """How many training examples the data makes (after packing; None: not known): the steps an epoch is."""
        self._train_examples = count
        self._update_length()

    def _update_length(self) -> None:
        """Show the spin of the chosen unit; say what it means in the other one; in epochs, max_steps follows."""
        epochs = self.in_epochs()
        self.max_steps.setVisible(not epochs)
        self.epochs.setVisible(epochs)
        count = self._train_examples
        if not count:
            self.length_hint.setText("")
            return
        batch, accumulation = self.batch_size.value(), self.gradient_accumulation.value()
        if epochs:
            steps = steps_for_epochs(self.epochs.value(), count, batch, accumulation)
            if self.max_steps.value() != steps:
                self.max_steps.setValue(steps)  # the progress bar and plots show the run's length in steps
            self.length_hint.setText(f"= {steps:,} steps")
        else:
            share = self.max_steps.value() / steps_per_epoch(count, batch, accumulation)
            self.length_hint.setText(f"≈ {share:,.3g} epochs")

    def training_config(self, base: TrainingConfig | None = None) -> TrainingConfig:
        """The form's values over `base` (fields the form does not show keep base's values)."""
        values = {f.name: getattr(base or FORM_DEFAULTS, f.name) for f in fields(TrainingConfig)}
        epochs = self.in_epochs()
        values.update(
            max_steps=None if epochs else self.max_steps.value(), epochs=self.epochs.value() if epochs else None,
            eval_every_epochs=None, save_every_epochs=None,  # the form gives both schedules in steps
            learning_rate=float(self.learning_rate.value()),
            batch_size=self.batch_size.value(), gradient_accumulation=self.gradient_accumulation.value(),
            warmup_ratio=round(float(self.warmup.value()), 4), schedule=self.schedule.currentText(),
            eval_every=self.eval_every.value(), eval_examples=self.eval_examples.value(),
            save_every=self.save_every.value(), spectrum_every=self.spectrum_every.value(),
            gradient_checkpointing=self.gradient_checkpointing.isChecked(), seed=self.seed.value(),
        )
        return TrainingConfig(**values)

    def set_training_config(self, config: TrainingConfig) -> None:
        self.learning_rate.setValue(config.learning_rate)
        self.length_unit.setCurrentIndex(self.length_unit.findData("steps" if config.epochs is None else "epochs"))
        if config.epochs is not None:
            self.epochs.setValue(config.epochs)
        if config.max_steps is not None:
            self.max_steps.setValue(config.max_steps)
        self.batch_size.setValue(config.batch_size)
        self.gradient_accumulation.setValue(config.gradient_accumulation)
        self.warmup.setValue(config.warmup_ratio)
        self.schedule.setCurrentText(config.schedule)
        self.eval_every.setValue(config.eval_every or 0)
        self.eval_examples.setValue(config.eval_examples)
        self.save_every.setValue(config.save_every or 0)
        self.spectrum_every.setValue(config.spectrum_every)
        self.gradient_checkpointing.setChecked(config.gradient_checkpointing)
        self.seed.setValue(config.seed)
