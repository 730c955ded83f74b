"""``ansible-lint --profile production`` over ansible/ (the playbook runs themselves are deployment
tests: tests/deploy, ``-m deploy``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LINT = str(BIN / "ansible-lint") if (BIN / "ansible-lint").exists() else shutil.which("ansible-lint")


@pytest.mark.skipif(LINT is None, reason="ansible-lint not installed (pip install -e '.[deploy]')")
def test_ansible_lint_production_profile() -> None:
    assert LINT is not None
    ansible = ROOT / "ansible"
    res = subprocess.run(
        [LINT, "-c", str(ansible / ".ansible-lint"), "--profile", "production", "--nocolor", str(ansible)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    assert res.returncode == 0, res.stdout[-8000:] + res.stderr[-4000:]
