"""The tree passes ruff's checks and formatting (pyproject.toml's [tool.ruff]): a style slip is
caught by the suite, not by the next reader. ruff is pinned in pyproject.toml, so a new release's
rules do not fail a clean checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUFF = Path(sys.executable).parent / "ruff"


def ruff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RUFF), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_check_passes() -> None:
    r = ruff("check", "--no-cache", ".")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format_leaves_the_tree_as_it_is() -> None:
    r = ruff("format", "--check", "--no-cache", ".")
    assert r.returncode == 0, r.stdout + r.stderr
