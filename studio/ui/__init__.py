"""The studio window: PySide6 widgets over `studio.core`. Nothing here is imported by the core."""
