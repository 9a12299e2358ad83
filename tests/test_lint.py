"""pyflakes over every Python file of the project: no unused imports or variables, no undefined names."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyflakes_finds_nothing() -> None:
    proc = subprocess.run([sys.executable, "-m", "pyflakes", "trainer", "controller", "bench", "tests"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_pyflakes_would_catch_an_unused_import(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("import os\n")
    proc = subprocess.run([sys.executable, "-m", "pyflakes", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 1 and "'os' imported but unused" in proc.stdout
