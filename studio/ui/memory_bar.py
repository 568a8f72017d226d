"""A stacked horizontal bar of the memory estimate's parts against the GPU's capacity, with a legend."""

from __future__ import annotations

from PySide6.QtCore import QRectF, QSize, Qt
from PySide6.QtGui import QColor, QPainter, QPaintEvent, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from studio.core.model.memory import MemoryEstimate
from studio.core.units import human_bytes

PART_COLOURS = (QColor("#4e79a7"), QColor("#f28e2b"), QColor("#59a14f"), QColor("#9c9c9c"))
BAR_HEIGHT = 22
LEGEND_ROW = 18


class MemoryBar(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._parts: list[tuple[str, int]] = []
        self._capacity: int | None = None
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.setMinimumHeight(self.sizeHint().height())

    def set_estimate(self, estimate: MemoryEstimate | None, capacity: int | None) -> None:
        self._parts = estimate.parts() if estimate is not None else []
        self._capacity = capacity
        self.setToolTip(
            "\n".join(f"{label}: {human_bytes(size)}" for label, size in self._parts)
            + (f"\nGPU memory: {human_bytes(capacity)}" if capacity else "")
        )
        self.update()

    @property
    def parts(self) -> list[tuple[str, int]]:
        return list(self._parts)

    def sizeHint(self) -> QSize:
        return QSize(300, BAR_HEIGHT + 6 + len(PART_COLOURS) * LEGEND_ROW)

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        width = self.width() - 2
        bar = QRectF(1, 1, width, BAR_HEIGHT)
        painter.setPen(QPen(self.palette().mid().color()))
        painter.setBrush(self.palette().base())
        painter.drawRect(bar)
        total = sum(size for _, size in self._parts)
        scale_max = max(total, self._capacity or 0) or 1
        x = bar.left()
        for (_, size), colour in zip(self._parts, PART_COLOURS, strict=False):
            w = width * size / scale_max
            painter.fillRect(QRectF(x, bar.top(), w, bar.height()), colour)
            x += w
        if self._capacity:
            cap_x = bar.left() + width * self._capacity / scale_max
            painter.setPen(QPen(self.palette().text().color(), 2, Qt.DashLine))
            painter.drawLine(int(cap_x) - 1, 0, int(cap_x) - 1, BAR_HEIGHT + 2)
        self._paint_legend(painter, BAR_HEIGHT + 6)
        painter.end()

    def _paint_legend(self, painter: QPainter, top: int) -> None:
        """One row per part: a colour swatch, the part's name, its size right-aligned."""
        painter.setPen(self.palette().text().color())
        for n, ((label, size), colour) in enumerate(zip(self._parts, PART_COLOURS, strict=False)):
            y = top + n * LEGEND_ROW
            painter.fillRect(QRectF(1, y + 4, 10, 10), colour)
            row = QRectF(16, y, self.width() - 18, LEGEND_ROW)
            painter.drawText(row, Qt.AlignVCenter | Qt.AlignLeft, label)
            painter.drawText(row, Qt.AlignVCenter | Qt.AlignRight, human_bytes(size))
