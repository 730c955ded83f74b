"""The command lines' conventions, in-process: options before or after the
subcommand, ``--version``, usage errors exit 64 with one line, human messages for bad URLs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from agent.cli import main as agent_main
from coordinator.cli import main as coordinator_main
from gpuctl.main import build_parser
from gpuctl.main import main as gpuctl_main
from gpufleet import __version__
from gpufleet.tomlconfig import EX_CONFIG

EX_USAGE = 64


@pytest.fixture(autouse=True)
def _no_global_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The CLIs configure structlog for the whole process (level, writer, cached loggers): in
    this test process that would change the logging of the tests that run after these."""
    import gpufleet.logsetup

    monkeypatch.setattr(gpufleet.logsetup, "configure_logging", lambda *a, **k: None)
    yield
    structlog.contextvars.clear_contextvars()


def run(main, argv: list[str]) -> int:  # type: ignore[no-untyped-def]
    """A CLI's exit status, whether it returns it or exits (argparse)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


@pytest.mark.parametrize(
    "argv",
    [
        ["--etcd", "http://e:2379", "--cluster", "prod", "-o", "json", "nodes"],
        ["nodes", "--etcd", "http://e:2379", "--cluster", "prod", "-o", "json"],
        ["-o", "json", "nodes", "--cluster", "prod", "--etcd", "http://e:2379"],
    ],
    ids=["before", "after", "mixed"],
)
def test_gpuctl_global_options_anywhere(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.cmd, args.output, args.etcd, args.cluster) == ("nodes", "json", "http://e:2379", "prod")


def test_gpuctl_global_options_in_nested_subcommands_and_defaults_kept() -> None:
    args = build_parser().parse_args(["--timeout", "3", "models", "list", "--etcd", "http://e:2379", "--user", "u"])
    assert (args.models_cmd, args.timeout, args.etcd, args.user, args.output) == (
        "list",
        3.0,
        "http://e:2379",
        "u",
        "table",
    )
    # A value given before the subcommand is not reset by the subcommand's default.
    args = build_parser().parse_args(["-o", "json", "--cacert", "ca.pem", "routes"])
    assert (args.output, args.cacert, args.cluster) == ("json", "ca.pem", "default")
    # A subcommand's own option of another name is untouched (demo --config is demo's).
    args = build_parser().parse_args(["demo", "--standalone", "--config", "x.toml", "-o", "json"])
    assert (args.config, args.output) == ("x.toml", "json")


def test_gpuctl_nodes_dash_o_json_after_the_subcommand_reaches_etcd(capfd: pytest.CaptureFixture[str]) -> None:
    """The issue's example: it used to exit 64; now it gets as far as etcd (unreachable: 2)."""
    code = gpuctl_main(["nodes", "-o", "json", "--etcd", "http://127.0.0.1:9", "--timeout", "0.2"])
    assert code == 2, capfd.readouterr().err
    assert "etcd unreachable" in capfd.readouterr().err


@pytest.mark.parametrize(
    ("main", "prog"), [(gpuctl_main, "gpuctl"), (agent_main, "gpu-agent"), (coordinator_main, "gpu-coordinator")]
)
def test_version(main, prog: str, capfd: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    assert run(main, ["--version"]) == 0
    assert capfd.readouterr().out.strip() == f"{prog} {__version__}"


@pytest.mark.parametrize(
    ("main", "argv", "prog"),
    [
        (gpuctl_main, ["frobnicate"], "gpuctl"),
        (gpuctl_main, ["nodes", "--bogus"], "gpuctl"),
        (gpuctl_main, ["-o", "yaml", "nodes"], "gpuctl"),
        (agent_main, ["--bogus"], "gpu-agent"),
        (agent_main, ["run", "extra"], "gpu-agent"),
        (coordinator_main, ["chek-config"], "gpu-coordinator"),
    ],
)
def test_usage_errors_exit_64_with_one_line(main, argv: list[str], prog: str, capfd) -> None:  # type: ignore[no-untyped-def]
    assert run(main, argv) == EX_USAGE
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{prog}") and ": error: " in err and "--help" in err


@pytest.mark.parametrize("main", [agent_main, coordinator_main], ids=["agent", "coordinator"])
@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "{f}", "run"],
        ["run", "--config", "{f}"],
        ["--config", "{f}", "check-config"],
        ["check-config", "--config", "{f}"],
        ["check-config", "{f}"],
    ],
)
def test_daemon_config_option_before_or_after_the_subcommand(  # type: ignore[no-untyped-def]
    main, argv: list[str], tmp_path: Path, capfd
) -> None:
    f = tmp_path / "absent.toml"
    assert run(main, [a.format(f=f) for a in argv]) == EX_CONFIG
    assert f"{f}: $: cannot read file" in capfd.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--etcd", "127.0.0.1:2379"], "--etcd: 127.0.0.1:2379 is not a URL; write http://127.0.0.1:2379"),
        (["--etcd", "http://a:1,ftp://b"], "--etcd: ftp://b: the scheme must be http:// or https://, not ftp://"),
        (["--etcd", "http://a:1", "--timeout", "0"], "--timeout: Expected `float` > 0.0"),
    ],
)
def test_gpuctl_etcd_option_errors_are_human(argv: list[str], message: str, capfd) -> None:  # type: ignore[no-untyped-def]
    assert gpuctl_main(["nodes", *argv]) == EX_USAGE
    assert capfd.readouterr().err.strip() == f"error: {message}"


CLUSTER_BASE = """
[gpu]
source = "simulated"
[[gpu.simulated]]
name = "NVIDIA A100-SXM4-80GB"
[cluster]
endpoints = ["http://127.0.0.1:2379"]
"""


@pytest.mark.parametrize(
    ("agent_section", "warned"),
    [
        ('listen_host = "127.0.0.1"', True),
        ('listen_host = "::1"\nnode_id = "gpu-1"', True),
        ('listen_host = "localhost"\nadvertise_url = "http://127.0.0.1:8080"', True),
        ('listen_host = "127.0.0.1"\nadvertise_url = "https://gpu-1.example:443"', False),  # a proxy in front
        ('listen_host = "0.0.0.0"\n[auth]\nhop_secret_file = "hop-secret"', False),  # reachable: keys, so a hop secret
    ],
)
def test_check_config_warns_of_cluster_mode_on_loopback(  # type: ignore[no-untyped-def]
    agent_section: str, warned: bool, tmp_path: Path, capfd
) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(CLUSTER_BASE + "[agent]\n" + agent_section + "\n")
    assert run(agent_main, ["check-config", str(f)]) == 0  # a warning, not a failure
    err = capfd.readouterr().err
    assert ("other nodes cannot reach this agent" in err) is warned, err
    if warned:
        assert f"{f}: warning: $.agent.listen_host: " in err


def test_standalone_on_loopback_is_not_warned(tmp_path: Path, capfd) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "agent.toml"
    f.write_text(
        CLUSTER_BASE.replace('endpoints = ["http://127.0.0.1:2379"]', "") + '[agent]\nlisten_host = "127.0.0.1"\n'
    )
    assert run(agent_main, ["check-config", str(f)]) == 0
    assert "cannot reach" not in capfd.readouterr().err


def test_upstream_keepalive_is_a_live_setting_again(tmp_path: Path, capfd) -> None:  # type: ignore[no-untyped-def]
    """[proxy] upstream_keepalive sizes the upstream pools now: no warning; a bad value names its field."""
    f = tmp_path / "agent.toml"
    base = CLUSTER_BASE.replace('endpoints = ["http://127.0.0.1:2379"]', "")
    f.write_text(base + "[proxy]\nupstream_keepalive = 8\n")
    assert run(agent_main, ["check-config", str(f)]) == 0
    assert "$.proxy.upstream_keepalive" not in capfd.readouterr().err
    f.write_text(base + "[proxy]\nupstream_keepalive = -1\n")
    assert run(agent_main, ["check-config", str(f)]) == 78
    assert "$.proxy.upstream_keepalive" in capfd.readouterr().err


def test_the_agent_warns_of_cluster_mode_on_loopback_at_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.daemon

    class Runtime:  # stands in for the daemon: only the start-up warning is wanted
        def __init__(self, cfg: object) -> None:
            pass

        async def run(self) -> int:
            return 0

    monkeypatch.setattr(agent.daemon, "AgentRuntime", Runtime)
    f = tmp_path / "agent.toml"
    f.write_text(CLUSTER_BASE + '[agent]\nlisten_host = "127.0.0.1"\n')
    with capture_logs() as logs:
        assert run(agent_main, ["run", "--config", str(f)]) == 0
    [warning] = [e for e in logs if e["event"] == "config_warning"]
    assert warning["log_level"] == "warning" and warning["field"] == "$.agent.listen_host"
    assert "other nodes cannot reach this agent" in warning["problem"]
