"""What becomes of rows longer than the maximum length, for the chosen or detected format: one combo of the
policies that format allows ("auto" first, naming what it means), and the overlap of windows when rows are split
into windows."""

from __future__ import annotations

from PySide6.QtCore import Signal, Slot
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QSpinBox, QWidget

from studio.core.data.spec import OVERFLOWS
from studio.ui.data_summary import OVERFLOW_CHOICES, field_help


class OverflowChoice(QWidget):
    sig_changed = Signal()  # the policy or the overlap changed

    def __init__(self, max_length: int, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.combo = QComboBox()
        self.combo.setToolTip(field_help("overflow"))
        self.stride_label = QLabel("overlap")
        self.stride_spin = QSpinBox()
        self.stride_spin.setRange(0, max_length - 1)
        self.stride_spin.setSuffix(" tokens")
        self.stride_spin.setSpecialValueText("none")
        self.stride_spin.setToolTip(field_help("stride"))
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for widget in (self.combo, self.stride_label, self.stride_spin):
            layout.addWidget(widget)
        layout.addStretch(1)
        self._format: str | None = None
        self.show_format(None, "auto")
        self.combo.currentIndexChanged.connect(self._on_combo_changed)
        self.stride_spin.valueChanged.connect(self.sig_changed)

    def overflow(self) -> str:
        return self.combo.currentData() or "auto"

    def stride(self) -> int:
        """The windows' overlap; 0 unless rows are split into windows."""
        return self.stride_spin.value() if self.resolved() == "window" else 0

    def resolved(self) -> str | None:
        """The policy in effect (auto resolved), None while the format is not known."""
        chosen = self.overflow()
        return chosen if chosen != "auto" else (OVERFLOWS[self._format][0] if self._format else None)  # type: ignore

    def set_max_length(self, max_length: int) -> None:
        self.stride_spin.setMaximum(max_length - 1)

    def show_format(self, fmt: str | None, chosen: str | None = None, stride: int | None = None) -> None:
        """The policies `fmt` allows (only auto while it is not known), keeping `chosen` (default: the current
        choice) when `fmt` allows it, else auto. Emits nothing."""
        chosen = self.overflow() if chosen is None else chosen
        self._format = fmt
        allowed = OVERFLOWS.get(fmt, ())  # type: ignore[call-overload]
        items = [("auto" + (f": {OVERFLOW_CHOICES[allowed[0]]}" if allowed else ""), "auto")]
        items += [(OVERFLOW_CHOICES[policy], policy) for policy in allowed]
        blocked = [w.blockSignals(True) for w in (self.combo, self.stride_spin)]
        self.combo.clear()
        for text, policy in items:
            self.combo.addItem(text, policy)
        self.combo.setCurrentIndex(max(0, self.combo.findData(chosen)))
        if stride is not None:
            self.stride_spin.setValue(stride)
        for widget, was in zip((self.combo, self.stride_spin), blocked):
            widget.blockSignals(was)
        self._show_stride()

    @Slot()
    def _on_combo_changed(self) -> None:
        self._show_stride()
        self.sig_changed.emit()

    def _show_stride(self) -> None:
        windowed = self.resolved() == "window"
        self.stride_label.setVisible(windowed)
        self.stride_spin.setVisible(windowed)
