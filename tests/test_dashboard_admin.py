"""The dashboard's admin token (``[coordinator] admin_token_file``): resolved like every path in
the file, and a file that cannot be used stops the start naming the field (exit 78). What the
token allows is tested in a real browser (tests/test_dashboard_browser.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import free_port

from coordinator.config import load_config
from gpufleet.facts import EX_CONFIG
from gpufleet.tomlwrite import dumps as toml_dumps
from gpufleet_dev.fleetconfig import coordinator_doc


def write_config(tmp: Path, admin_token_file: str) -> Path:
    doc = coordinator_doc("c1", free_port(), ["http://127.0.0.1:1"], "ui")
    doc["coordinator"]["admin_token_file"] = admin_token_file
    path = tmp / "coordinator.toml"
    path.write_text(toml_dumps(doc))
    return path


def start(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator", "--config", str(config)], capture_output=True, text=True, timeout=60
    )


def test_a_relative_admin_token_file_is_read_beside_the_config(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path, "admin-token")).coordinator.admin_token_file == str(
        tmp_path / "admin-token"
    )


def test_an_unusable_admin_token_file_stops_the_start(tmp_path: Path) -> None:
    token = tmp_path / "admin-token"
    config = write_config(tmp_path, str(token))
    missing = start(config)
    assert missing.returncode == EX_CONFIG
    assert "$.coordinator.admin_token_file: cannot read admin token file" in missing.stdout + missing.stderr
    token.write_text("admin-token-0123456789abcdef\n")
    token.chmod(0o666)
    shared = start(config)
    assert shared.returncode == EX_CONFIG and "admin token file" in shared.stdout + shared.stderr
    assert "writable by every user" in shared.stdout + shared.stderr
    token.write_text("short\n")
    token.chmod(0o600)
    short = start(config)
    assert short.returncode == EX_CONFIG and "shorter than 16 characters" in short.stdout + short.stderr
