from __future__ import annotations

import pytest

from studio.core.units import human_bytes, human_count


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (9823216, "9.4 MiB"),
                                     (3 * 1024**3, "3.0 GiB"), (5 * 1024**4, "5.0 TiB"),
                                     (2048 * 1024**4, "2048.0 TiB")])
def test_human_bytes_uses_binary_units_up_to_tib(n, text):
    assert human_bytes(n) == text


@pytest.mark.parametrize("n, text", [(999, "999"), (1500, "1.5K"), (134515008, "134.5M"), (7 * 10**9, "7.0B")])
def test_human_count_rounds_to_one_decimal_with_a_suffix(n, text):
    assert human_count(n) == text


def test_the_cli_and_the_window_format_bytes_with_the_core_function():
    import studio.cli as cli
    import studio.ui.adapter_panel as adapter_panel
    import studio.ui.memory_bar as memory_bar

    assert cli.human_bytes is human_bytes
    assert adapter_panel.human_bytes is human_bytes and memory_bar.human_bytes is human_bytes
