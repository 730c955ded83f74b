"""What the package ships, in the checkout (fast) and from the built wheel on its own (slow).

The wheel, installed into a fresh virtualenv and run from a directory that is not the checkout,
answers ``--version``, ships the example configs and the systemd units (``gpuctl files``), and
runs ``gpuctl demo --standalone`` to the point where the agent serves, writing nothing into
the installed package.

The wheel is built from a copy of the sources without ``build/`` (setuptools would pack what an
earlier build left there, e.g. a module since moved) and installed with its dependencies from the
package index pip is configured with (PyPI on CI; pip's cache makes a second run quick). Nothing
of the checkout is on the installed programs' ``sys.path``: they run with a temporary working
directory and without PYTHONPATH, and the test checks where the modules came from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Sequence
from pathlib import Path

import pytest

from gpuctl.common import UsageError
from gpuctl.main import build_parser
from gpufleet import data

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
SHIPPED = sorted(
    [f"examples/{p.name}" for p in (ROOT / "examples").glob("*.toml")]
    + [f"systemd/{p.name}" for p in (ROOT / "systemd").glob("*.service")]
)
NOT_SOURCES = (".git", ".venv", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", ".demo", "build", "dist")


def test_the_package_data_are_the_repository_files() -> None:
    """gpufleet/data's symlinks reach every example and unit, and nothing else."""
    files = data.shipped()
    assert list(files) == SHIPPED
    assert all(path == (ROOT / name).resolve() for name, path in files.items())
    assert data.find("gpu-agent.service") == ROOT / "systemd/gpu-agent.service"


def test_gpuctl_files_prints_a_unit_for_this_installation(capsys: pytest.CaptureFixture[str]) -> None:
    def gpuctl_files(name: str) -> int:  # in-process, without main()'s logging set-up
        args = build_parser().parse_args(["files", name])
        return args.func(args)

    assert gpuctl_files("systemd/gpu-coordinator.service") == 0
    text = capsys.readouterr().out
    scripts = sysconfig.get_path("scripts")
    assert f"ExecStart={scripts}/gpu-coordinator --config" in text
    shipped = (ROOT / "systemd/gpu-coordinator.service").read_text()
    assert text == shipped.replace("/opt/gpufleet/venv/bin/", f"{scripts}/")
    with pytest.raises(UsageError, match=re.escape("no shipped file 'nope.toml'; one of: examples/coordinator.toml")):
        gpuctl_files("nope.toml")


class Install:
    def __init__(self, venv: Path, cwd: Path) -> None:
        self.venv, self.bin, self.cwd = venv, venv / "bin", cwd
        self.site = Path(self.python("-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())

    def env(self) -> dict[str, str]:
        """This environment without a way back to the checkout: no PYTHONPATH, no .venv on PATH."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        path = [p for p in env.get("PATH", "").split(os.pathsep) if p and not Path(p).is_relative_to(ROOT)]
        env["PATH"] = os.pathsep.join([str(self.bin), *path])
        return env

    def run(self, argv: Sequence[str | Path], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in argv], cwd=self.cwd, env=self.env(), capture_output=True, text=True, timeout=timeout
        )

    def python(self, *args: str) -> subprocess.CompletedProcess[str]:
        res = self.run([self.bin / "python", *args])
        assert res.returncode == 0, res.stderr
        return res


def _check(res: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert res.returncode == 0, f"{res.args} exited {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Install:
    work = tmp_path_factory.mktemp("packaging")
    src = work / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    _check(
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(work / "dist")],
            capture_output=True,
            text=True,
            timeout=300,
        )
    )
    (wheel,) = (work / "dist").glob("gpufleet-*.whl")
    # The project venv's interpreter makes a venv on its base Python: no site-packages shared.
    _check(subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], capture_output=True, text=True))
    cwd = work / "elsewhere"
    cwd.mkdir()
    inst = Install(work / "venv", cwd)
    _check(inst.run([inst.bin / "python", "-m", "pip", "install", "-q", wheel], timeout=480))
    return inst


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_installed_modules_come_from_the_wheel(installed: Install) -> None:
    probe = (
        "import json, sys, agent, coordinator, gpuctl, gpufleet, gpufleet_dev; "
        "print(json.dumps({'files': [m.__file__ for m in (agent, coordinator, gpuctl, gpufleet, gpufleet_dev)], "
        "'path': sys.path}))"
    )
    out = json.loads(installed.python("-c", probe).stdout)
    for f in out["files"]:
        assert Path(f).is_relative_to(installed.site), f
    assert not any(p and Path(p).resolve().is_relative_to(ROOT) for p in out["path"]), out["path"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_command_answers_version(installed: Install) -> None:
    for cmd in ("gpu-agent", "gpu-coordinator", "gpuctl"):
        res = _check(installed.run([installed.bin / cmd, "--version"]))
        assert res.stdout.strip() == f"{cmd} {VERSION}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_examples_and_units_are_shipped(installed: Install) -> None:
    listed = json.loads(_check(installed.run([installed.bin / "gpuctl", "files", "-o", "json"])).stdout)
    assert [f["name"] for f in listed] == SHIPPED
    for f in listed:
        path = Path(f["path"])
        assert path.is_relative_to(installed.site / "gpufleet" / "data"), path
        assert path.read_bytes() == (ROOT / f["name"]).read_bytes(), f["name"]
    # A unit is printed for this installation: ExecStart= names this virtualenv's daemon.
    for unit, daemon in (("gpu-agent.service", "gpu-agent"), ("gpu-coordinator.service", "gpu-coordinator")):
        text = _check(installed.run([installed.bin / "gpuctl", "files", unit])).stdout
        (exec_start,) = [line for line in text.splitlines() if line.startswith("ExecStart=")]
        assert exec_start.split("=", 1)[1].split()[0] == str(installed.bin / daemon)
        assert (installed.bin / daemon).exists()
    example = _check(installed.run([installed.bin / "gpuctl", "files", "vllm-two-instances.toml"])).stdout
    assert example == (ROOT / "examples/vllm-two-instances.toml").read_text()
    res = installed.run([installed.bin / "gpuctl", "files", "no-such-file.toml"])
    assert res.returncode == 64 and "one of: examples/coordinator.toml" in res.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_dashboard_is_shipped(installed: Install) -> None:
    """The coordinator serves /ui from its package: the page, script and style sheet are in the wheel."""
    static = sorted(p.name for p in (ROOT / "coordinator/ui/static").iterdir())
    assert static == ["app.js", "index.html", "style.css"]
    for name in static:
        shipped = installed.site / "coordinator/ui/static" / name
        assert shipped.read_bytes() == (ROOT / "coordinator/ui/static" / name).read_bytes(), name


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_standalone_demo_runs_from_the_wheel(installed: Install) -> None:
    def package_files() -> set[Path]:  # bytecode aside, which Python writes on first import
        return {p for p in installed.site.rglob("*") if "__pycache__" not in p.parts}

    before = package_files()
    res = installed.run([installed.bin / "gpuctl", "demo", "--standalone", "--duration", "1"], timeout=180)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    # The agent answered /v1/status with every instance READY (the demo waits for /readyz first).
    assert "node demo-node" in out and "ready=yes" in out, out[-4000:]
    # The demo's state goes to the working directory, never into the installed package.
    assert package_files() == before, sorted(map(str, package_files() ^ before))[:20]
    assert any(installed.cwd.iterdir()), "the demo wrote nothing into its working directory"
