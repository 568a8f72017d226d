"""The layout is the architecture: import-linter contracts (the core never imports Qt; cli > ui > core; inside the
core train and gguf > adapters > model and data > the shared modules; no cycles), a fresh interpreter that imports
the whole core without Qt, and no private name imported from another module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_import_linter_contract_is_kept():
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(linter)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 4 kept, 0 broken" in result.stdout


def test_importing_every_core_module_loads_no_qt():
    core = ROOT / "studio" / "core"
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for p in core.rglob("*.py"))
    assert len(modules) > 30  # the whole core, its subpackages included
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "bad = [m for m in sys.modules if m.startswith(('PySide6', 'pyqtgraph', 'studio.ui'))]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_no_module_imports_a_private_name_from_another():
    """A name shared between modules is public: `from studio.x import _helper` hides a dependency."""
    offenders = []
    for path in sorted((ROOT / "studio").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("studio"):
                offenders += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.endswith("__")]
    assert offenders == []
