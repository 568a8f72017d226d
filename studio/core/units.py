"""How numbers read for a person, the same in the window and on the command line: parameter counts and byte
sizes taken in at a glance."""

from __future__ import annotations


def human_count(n: int) -> str:
    """134515008 -> "134.5M"; small counts stay exact."""
    for size, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if abs(n) >= size:
            return f"{n / size:.1f}{suffix}"
    return str(n)


def human_bytes(n: float) -> str:
    """Binary units, as the GPU tools show them: 9823216 -> "9.4 MiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
