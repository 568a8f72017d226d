"""Can Qt open a window here? Checked before the QApplication exists, because Qt's own answer to a missing
display or a missing xcb library is an abort with a cryptic line ("could not load the Qt platform plugin").

No Qt import: the check must run even when Qt cannot start.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Iterable, Mapping

# The system libraries Qt's xcb platform plugin (libqxcb.so, libQt6XcbQpa, libQt6Gui) links against,
# with the Debian/Ubuntu package that ships each (read from the plugin's NEEDED entries).
XCB_LIBRARIES: dict[str, str] = {
    "libxcb.so.1": "libxcb1",
    "libX11.so.6": "libx11-6",
    "libX11-xcb.so.1": "libx11-xcb1",
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-render.so.0": "libxcb-render0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-util.so.1": "libxcb-util1",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libGL.so.1": "libgl1",
    "libEGL.so.1": "libegl1",
    "libfontconfig.so.1": "libfontconfig1",
    "libfreetype.so.6": "libfreetype6",
    "libdbus-1.so.3": "libdbus-1-3",
    "libglib-2.0.so.0": "libglib2.0-0",
}

NO_DISPLAY_MESSAGE = (
    "lora-studio: no display to open the window on (neither DISPLAY nor WAYLAND_DISPLAY is set). "
    "Run it inside a desktop session, or set QT_QPA_PLATFORM=offscreen to render without a screen "
    "(screenshots, tests); the headless commands work anywhere: lora-studio --help"
)


def missing_libraries(sonames: Iterable[str] = XCB_LIBRARIES) -> list[str]:
    """The libraries the system's dynamic loader cannot open (each one tried exactly as Qt would load it)."""
    missing = []
    for soname in sonames:
        try:
            ctypes.CDLL(soname)
        except OSError:
            missing.append(soname)
    return missing


def install_command(missing: Iterable[str]) -> str:
    """The apt-get line that installs the packages shipping `missing` libraries."""
    packages = sorted({XCB_LIBRARIES.get(soname, soname) for soname in missing})
    return "sudo apt-get install -y " + " ".join(packages)


def missing_libraries_message(missing: list[str]) -> str:
    return (
        f"lora-studio: the window needs system libraries that are missing ({', '.join(missing)}). "
        f"Install them with:\n    {install_command(missing)}\n"
        "or render without a screen with QT_QPA_PLATFORM=offscreen."
    )


def uses_xcb(env: Mapping[str, str]) -> bool:
    """Whether Qt will pick its X11 (xcb) plugin: asked for explicitly, or the default outside Wayland."""
    chosen = env.get("QT_QPA_PLATFORM", "").split(";")[0].split(":")[0].strip()
    if chosen:
        return chosen == "xcb"
    on_wayland = bool(env.get("WAYLAND_DISPLAY")) and env.get("XDG_SESSION_TYPE", "wayland") == "wayland"
    return not on_wayland


def display_problem(env: Mapping[str, str], missing: list[str] | None = None) -> str | None:
    """Why the window cannot open here (one message for the user), or None when it can.

    `missing` is the list of unloadable xcb libraries; None means: find them with `missing_libraries()`.
    """
    if not sys.platform.startswith("linux"):
        return None
    explicit = env.get("QT_QPA_PLATFORM", "").strip()
    if not explicit and not env.get("DISPLAY") and not env.get("WAYLAND_DISPLAY"):
        return NO_DISPLAY_MESSAGE
    if not uses_xcb(env):
        return None
    if not env.get("DISPLAY"):
        return NO_DISPLAY_MESSAGE
    if missing is None:
        missing = missing_libraries()
    return missing_libraries_message(missing) if missing else None
