"""A real llama.cpp ``llama-server`` (built by scripts/build-llama-server) and tiny models.

The binary is built once per llama.cpp version and cached outside the clone (scripts/bootstrap
builds it when it can); here we only ask the script for its path, which costs nothing once it
is built. Without it these tests skip, except in CI (``CI`` set), where a skip would hide that
the real backend was never tried: there they fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tinymodel import write_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build-llama-server"


def _cached_binary() -> tuple[str | None, str]:
    """The cached llama-server, without building (a build takes minutes: bootstrap's job)."""
    try:
        out = subprocess.run([str(BUILD_SCRIPT), "--cached"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{BUILD_SCRIPT.name}: {e}"
    if out.returncode == 0 and out.stdout.strip():
        return out.stdout.strip().splitlines()[-1], ""
    return None, out.stderr.strip() or f"{BUILD_SCRIPT.name} --cached exited {out.returncode}"


@pytest.fixture(scope="session")
def llama_server() -> str:
    binary, why = _cached_binary()
    if binary is None:
        msg = f"no llama-server built ({why}); run scripts/build-llama-server (about 8 min on 2 cores)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return binary


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight llama (2 layers, hidden 64) that *declares* a 1M-token context."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama.gguf")
