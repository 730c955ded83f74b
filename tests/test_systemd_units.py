"""The shipped systemd units pass `systemd-analyze verify` with nothing on stderr.

verify exits 0 on unknown keys and only warns, so stderr is what we check. The unit's
ExecStart points at the install path; we verify a copy pointing at this checkout's binary.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "systemd").glob("*.service"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_verifies_cleanly(unit: Path, tmp_path: Path) -> None:
    bindir = Path(sys.executable).parent
    text = unit.read_text().replace("/opt/gpufleet/venv/bin/", f"{bindir}/")
    copy = tmp_path / unit.name
    copy.write_text(text)
    res = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == ""


def test_agent_unit_essentials() -> None:
    text = (ROOT / "systemd" / "gpu-agent.service").read_text()
    for line in (
        "Type=notify",
        "KillMode=mixed",
        "RestartPreventExitStatus=78",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "Delegate=cpu",
        "User=gpu-agent",
        "DeviceAllow=/dev/nvidiactl rw",
    ):
        assert line in text.splitlines(), line
