"""A wheel install works without the source tree: the wheel carries the demo dataset, the .desktop file and the
icons to the data paths resources.py looks in, and the shipped icon loads in Qt."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from studio.core.data.dataset import DEMO_DIR
from studio.core.resources import MARKER, candidate_roots, installed_root, resources_root

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "resources"
SHARE = "share/lora-studio"
SHIPPED = {  # install path under the wheel's data folder -> source file
    f"{SHARE}/demo/train.jsonl": "demo/train.jsonl",
    f"{SHARE}/demo/heldout.jsonl": "demo/heldout.jsonl",
    f"{SHARE}/demo/README.md": "demo/README.md",
    f"{SHARE}/icons/lora-studio.svg": "icons/lora-studio.svg",
    f"{SHARE}/icons/lora-studio.png": "icons/lora-studio.png",
    "share/applications/lora-studio.desktop": "lora-studio.desktop",
    "share/icons/hicolor/scalable/apps/lora-studio.svg": "icons/lora-studio.svg",
    "share/icons/hicolor/256x256/apps/lora-studio.png": "icons/lora-studio.png",
}


@pytest.fixture(scope="module")
def wheel_path(tmp_path_factory) -> Path:
    """The wheel pip builds from a copy of the project (a build writes build/ and *.egg-info into its source)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("studio", "resources"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"wheel built in {time.monotonic() - started:.1f} s")
    (wheel,) = out.glob("lora_studio-*.whl")
    return wheel


def _data_prefix(wheel_path: Path) -> str:
    """Where a wheel keeps files for the data path: `<name>-<version>.data/data/` (the wheel spec)."""
    name, version = wheel_path.name.split("-")[:2]
    return f"{name}-{version}.data/data/"


def test_wheel_ships_demo_desktop_file_and_icons_to_share(wheel_path):
    with zipfile.ZipFile(wheel_path) as wheel:
        data = _data_prefix(wheel_path)
        names = set(wheel.namelist())
        for install_path, source in SHIPPED.items():
            assert data + install_path in names, f"{install_path} missing from {wheel_path.name}"
            assert wheel.read(data + install_path) == (SOURCE / source).read_bytes(), install_path
        assert "studio/core/resources.py" in names
        assert not any(n.startswith(("tests/", "resources/")) for n in names)


def test_wheel_desktop_entry_launches_lora_studio_with_its_icon(wheel_path):
    with zipfile.ZipFile(wheel_path) as wheel:
        text = wheel.read(_data_prefix(wheel_path) + "share/applications/lora-studio.desktop").decode()
    entry = configparser.ConfigParser(interpolation=None)
    entry.optionxform = str  # keys are case-sensitive
    entry.read_string(text)
    desktop = entry["Desktop Entry"]
    assert desktop["Type"] == "Application"
    assert desktop["Exec"].split()[0] == "lora-studio"
    assert desktop["Icon"] == "lora-studio"
    assert desktop["Name"] == "LoRA Studio"
    validator = shutil.which("desktop-file-validate")
    if validator:  # desktop-file-utils is optional; the keys above are checked either way
        result = subprocess.run([validator, str(SOURCE / "lora-studio.desktop")], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_resources_root_takes_the_install_location_when_the_source_tree_is_absent(tmp_path):
    source, installed = tmp_path / "checkout" / "resources", tmp_path / "prefix" / "share" / "lora-studio"
    assert resources_root([source, installed]) == installed_root()  # neither holds the files
    (installed / MARKER).parent.mkdir(parents=True)
    (installed / MARKER).write_text("{}\n")
    assert resources_root([source, installed]) == installed
    (source / MARKER).parent.mkdir(parents=True)
    (source / MARKER).write_text("{}\n")
    assert resources_root([source, installed]) == source


def test_a_checkout_finds_its_own_resources_and_looks_in_the_install_data_paths():
    roots = candidate_roots()
    assert roots[0] == SOURCE
    assert Path(sysconfig.get_path("data")) / "share" / "lora-studio" in roots
    assert resources_root() == SOURCE
    assert DEMO_DIR == SOURCE / "demo"


def test_installed_wheel_finds_its_demo_outside_the_source_tree(wheel_path, tmp_path):
    """Install the wheel into a bare venv (its dependencies come from this interpreter's site-packages through a
    .pth file) and run `lora-studio init-run` from a folder far from the checkout."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    venv_site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip())
    # Only this venv's .pth files run, so an editable install of the checkout in the outer environment stays off.
    (venv_site / "outer.pth").write_text(sysconfig.get_path("purelib") + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    where = subprocess.run(
        [str(python), "-c", "import studio, studio.core.resources as r; print(studio.__file__, r.app_icon_path())"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert where.returncode == 0, where.stderr
    package_file, icon = map(Path, where.stdout.split())
    assert package_file.is_relative_to(venv)
    root = venv / "share" / "lora-studio"
    assert icon == root / "icons" / "lora-studio.svg" and icon.is_file()
    assert (root / "demo" / "train.jsonl").read_bytes() == (DEMO_DIR / "train.jsonl").read_bytes()

    init = subprocess.run(
        [str(venv / "bin" / "lora-studio"), "init-run", "run.yaml"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert init.returncode == 0, init.stderr
    assert str(root / "demo" / "train.jsonl") in (tmp_path / "run.yaml").read_text()


def test_shipped_icon_loads_at_16_and_256_pixels(qapp):
    from PySide6.QtGui import QIcon, QPixmap
    from PySide6.QtSvg import QSvgRenderer

    svg, png = SOURCE / "icons" / "lora-studio.svg", SOURCE / "icons" / "lora-studio.png"
    assert QSvgRenderer(str(svg)).isValid()
    pixmap = QPixmap(str(png))
    assert not pixmap.isNull() and (pixmap.width(), pixmap.height()) == (256, 256)
    icon = QIcon(str(svg))
    for size in (16, 256):
        image = icon.pixmap(size, size).toImage()
        assert (image.width(), image.height()) == (size, size)
        assert image.pixelColor(size // 2, size // 2).alpha() == 255  # drawn, not an empty transparent square
        assert image.pixelColor(0, 0).alpha() == 0  # the rounded corner stays clear
