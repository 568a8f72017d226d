"""The core's number formats, under the name the window's older modules import them by (adapter_panel,
memory_bar, main_window); new code imports studio.core.units."""

from __future__ import annotations

from studio.core.units import human_bytes, human_count

__all__ = ["human_bytes", "human_count"]
