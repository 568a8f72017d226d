"""Before Qt starts: a missing display or missing xcb libraries give one clear message, not Qt's abort."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from studio.ui.display import (
    NO_DISPLAY_MESSAGE,
    XCB_LIBRARIES,
    display_problem,
    install_command,
    missing_libraries,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="X11/Wayland checks are Linux-only")


def test_missing_xcb_libraries_name_the_apt_packages():
    message = display_problem({"DISPLAY": ":0"}, missing=["libxcb-keysyms.so.1", "libxcb-icccm.so.4"])
    assert message is not None
    assert "libxcb-keysyms.so.1, libxcb-icccm.so.4" in message
    assert "\n    sudo apt-get install -y libxcb-icccm4 libxcb-keysyms1\n" in message


def test_nothing_missing_means_no_problem():
    assert display_problem({"DISPLAY": ":0"}, missing=[]) is None


def test_every_known_library_maps_to_a_package():
    assert install_command(XCB_LIBRARIES) == "sudo apt-get install -y " + " ".join(sorted(XCB_LIBRARIES.values()))
    assert install_command(["libxcb-cursor.so.0"]) == "sudo apt-get install -y libxcb-cursor0"


def test_the_loader_finds_what_exists_and_reports_what_does_not():
    assert missing_libraries(["libc.so.6", "libno-such-library-here.so.7"]) == ["libno-such-library-here.so.7"]


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({}, NO_DISPLAY_MESSAGE),
        ({"QT_QPA_PLATFORM": "xcb"}, NO_DISPLAY_MESSAGE),
        ({"QT_QPA_PLATFORM": "offscreen"}, None),
        ({"WAYLAND_DISPLAY": "wayland-0", "XDG_SESSION_TYPE": "wayland"}, None),  # Qt picks its wayland plugin
        ({"QT_QPA_PLATFORM": "wayland;xcb", "WAYLAND_DISPLAY": "wayland-0"}, None),
    ],
)
def test_which_platform_needs_which_check(env, problem):
    assert display_problem(env, missing=["libxcb-icccm.so.4"]) == problem


def test_run_gui_without_a_display_exits_2_with_the_message():
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    done = subprocess.run(
        [sys.executable, "-c", "from studio.ui.app import run_gui; raise SystemExit(run_gui())"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == NO_DISPLAY_MESSAGE
