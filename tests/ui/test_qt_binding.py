"""The Qt binding must keep Python's reference counts: the live plots make hundreds of Qt calls per repaint.

PySide6 6.12.0 on Python 3.11 returns None from every void method without taking a reference to it, so each
call such as `label.setText(...)` drops None's count by one; after a few thousand calls Python aborts with
"none_dealloc: deallocating None". (From 3.12 on, None is immortal and the missing reference is harmless.)
"""

from __future__ import annotations

import sys

from PySide6.QtGui import QImage, QPainter, QPen
from PySide6.QtWidgets import QLabel

CALLS = 200


def test_void_qt_calls_leave_the_reference_count_of_none_alone(qapp):
    label = QLabel()
    image = QImage(8, 8, QImage.Format_ARGB32)
    painter = QPainter(image)
    try:
        label.setText("warm-up")
        painter.setPen(QPen())
        before = sys.getrefcount(None)
        for _ in range(CALLS):
            label.setText("x")
            painter.setPen(QPen())
            painter.drawLine(0, 0, 4, 4)
        after = sys.getrefcount(None)
    finally:
        painter.end()
    assert after - before > -CALLS, (
        f"each void Qt call lost a reference to None ({after - before} over {3 * CALLS} calls): this PySide6 build "
        "crashes Python within minutes of live plotting; use another PySide6 version (6.11.x works on Python 3.11)"
    )
