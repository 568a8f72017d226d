"""The studio window: PySide6 + pyqtgraph widgets that only call studio.core."""
