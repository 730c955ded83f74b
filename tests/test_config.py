"""Config errors name the file and the field, and the daemon refuses to start the same way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_config
from gpufleet.tomlconfig import EX_CONFIG, ConfigError

ROOT = Path(__file__).resolve().parent.parent

BASE = """
[gpu]
source = "simulated"
[[gpu.simulated]]
name = "NVIDIA A100-SXM4-80GB"
"""


def problems(tmp_path: Path, text: str) -> list[str]:
    f = tmp_path / "agent.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    return str(e.value).splitlines()


AGENT_EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.toml") if p.name != "coordinator.toml")


@pytest.mark.parametrize("example", AGENT_EXAMPLES, ids=lambda p: p.name)
def test_shipped_examples_are_valid(example: Path) -> None:
    cfg = load_config(example)
    assert cfg.instances


def test_coordinator_example_and_rules(tmp_path: Path) -> None:
    from coordinator.config import load_config as load_coordinator

    cfg = load_coordinator(ROOT / "examples" / "coordinator.toml")
    assert cfg.election.renew_deadline_s < cfg.election.lease_ttl_s
    bad = tmp_path / "c.toml"
    bad.write_text('[etcd]\nendpoints = ["ftp://x"]\n[election]\nlease_ttl_s = 10\nrenew_deadline_s = 12\n')
    with pytest.raises(ConfigError) as e:
        load_coordinator(bad)
    assert "$.etcd.endpoints[0]: ftp://x: the scheme must be http:// or https://, not ftp://" in str(e.value)
    bad.write_text('[etcd]\nendpoints = ["http://x:2379"]\n[election]\nlease_ttl_s = 10\nrenew_deadline_s = 12\n')
    with pytest.raises(ConfigError) as e:
        load_coordinator(bad)
    assert "$.election.renew_deadline_s: must be shorter than lease_ttl_s (10s)" in str(e.value)


def test_vllm_example_splits_one_gpu_04_03() -> None:
    cfg = load_config(ROOT / "examples" / "vllm-two-instances.toml")
    assert [(i.gpus, i.gpu_memory_fraction) for i in cfg.instances] == [([0], 0.4), ([0], 0.3)]


def test_koboldcpp_example_has_gpu_and_cpu_instance() -> None:
    cfg = load_config(ROOT / "examples" / "koboldcpp-gpu-and-cpu.toml")
    assert [i.gpus for i in cfg.instances] == [[0], []]


def test_every_problem_is_reported_with_its_path(tmp_path: Path) -> None:
    lines = problems(
        tmp_path,
        BASE
        + """
[agent]
listen_port = "eighty"

[[instances]]
name = "ok"
backend = "vllm"
model = "m"

[[instances]]
name = "bad-port"
backend = "vllm"
model = "m"
port = 70000

[[instances]]
name = "../etc"
backend = "vllm"
model = "m"

[[instances]]
name = "typo"
backend = "vllm"
model = "m"
gpu_memroy_fraction = 0.5
""",
    )
    f = tmp_path / "agent.toml"
    assert lines == [
        f"{f}: $.agent.listen_port: Expected `int`, got `str`",
        f"{f}: $.instances[1].port: Expected `int` <= 65535",
        f"{f}: $.instances[2].name: Expected `str` matching regex '^[A-Za-z0-9][A-Za-z0-9_.-]{{0,62}}$'",
        f"{f}: $.instances[3]: Object contains unknown field `gpu_memroy_fraction`",
    ]


def test_semantic_problems(tmp_path: Path) -> None:
    lines = problems(
        tmp_path,
        BASE
        + """
[agent]
listen_port = 8080

[[instances]]
name = "a"
backend = "vllm"
model = "m"
gpus = [0]
gpu_memory_fraction = 0.6
port = 8080

[[instances]]
name = "a"
backend = "vllm"
model = "m"
gpus = [0, 3]
gpu_memory_fraction = 0.5

[[instances]]
name = "c"
backend = "command"
command = ["server"]
served_model_name = "x"

[[instances]]
name = "d"
backend = "llamacpp"
model = "m.gguf"
gpu_memory_fraction = 0.2
""",
    )
    text = "\n".join(lines)
    assert "$.instances[0].port: 8080 is the agent's own listen_port" in text
    assert "$.instances[1].name: duplicate name 'a' (also instances[0])" in text
    assert "$.instances[1].gpus: GPU 3 does not exist (1 simulated GPUs declared)" in text
    assert "$.instances[2].command: must contain {port}" in text
    assert "$.instances[3].gpu_memory_fraction: set but gpus is empty (CPU-only instance)" in text
    # Over-commitment names every instance on the GPU.
    assert (
        "$.instances[1].gpu_memory_fraction: GPU 0 over-committed: a (0.6), a (0.5) sum to 1.10 > memory_budget 0.95"
        in text
    )


def test_missing_fraction_and_unknown_section(tmp_path: Path) -> None:
    lines = problems(
        tmp_path,
        BASE
        + """
[supervisr]
x = 1
[[instances]]
name = "a"
backend = "vllm"
model = "m"
gpus = [0]
""",
    )
    assert any(line.endswith("$.supervisr: unknown section") for line in lines)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    [line] = problems(tmp_path, "[agent\nlisten_port = 1")
    assert ": $: invalid TOML: " in line and "line 1" in line
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "absent.toml")
    assert "absent.toml: $: cannot read file: No such file or directory" in str(e.value)


def test_simulated_without_gpus_and_nvml_with_simulated(tmp_path: Path) -> None:
    assert any(
        "needs at least one [[gpu.simulated]]" in ln for ln in problems(tmp_path, '[gpu]\nsource = "simulated"\n')
    )
    text = '[gpu]\nsource = "nvml"\n[[gpu.simulated]]\nname = "x"\n'
    assert any('simulated GPUs are declared but source = "nvml"' in ln for ln in problems(tmp_path, text))


def test_relative_paths_resolve_against_the_config_dir(tmp_path: Path) -> None:
    f = tmp_path / "sub" / "agent.toml"
    f.parent.mkdir()
    f.write_text(BASE + '[agent]\nstate_dir = "state"\nadmin_token_file = "../token"\n')
    cfg = load_config(f)
    assert cfg.agent.state_dir == str(tmp_path / "sub" / "state")
    assert cfg.agent.admin_token_file == str(tmp_path / "token")


def run_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=60)


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    ok = run_agent("check-config", str(ROOT / "examples" / "standalone-demo.toml"))
    assert ok.returncode == 0 and "ok (4 instances" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(BASE + '[[instances]]\nname = "a"\nbackend = "vllm"\nmodel = "m"\nport = 0\n')
    res = run_agent("check-config", str(bad))
    assert res.returncode == EX_CONFIG
    assert res.stderr.strip() == f"{bad}: $.instances[0].port: Expected `int` >= 1"


def test_daemon_refuses_to_start_on_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent]\nlisten_port = -1\n")
    res = run_agent("--config", str(bad))
    assert res.returncode == EX_CONFIG
    assert f"{bad}: $.agent.listen_port: Expected `int` >= 1" in res.stderr


def test_nvml_absent_is_a_clear_startup_error(tmp_path: Path) -> None:
    """This machine has no NVIDIA driver: asking for NVML must fail loudly, never simulate."""
    pytest.importorskip("pynvml")
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:  # pragma: no cover - only on a GPU host
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this host")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'[agent]\nlisten_port = 1\nstate_dir = "{tmp_path}"\nlog_dir = "{tmp_path}"\n[gpu]\nsource = "nvml"\n'
    )
    res = run_agent("--config", str(cfg))
    assert res.returncode == 69
    assert "NVML is not available" in res.stderr and 'source = \\"simulated\\"' in res.stderr


def test_server_sizing_settings_are_given_once_and_only_where_supported(tmp_path: Path) -> None:
    lines = problems(
        tmp_path,
        BASE
        + """
[[instances]]
name = "twice"
backend = "llamacpp"
model = "/m/q.gguf"
context_size = 4096
args = ["--ctx-size=8192"]

[[instances]]
name = "keyed"
backend = "vllm"
model = "m"
api_key_file = "/etc/key"
args = ["--api-key", "k"]

[[instances]]
name = "nokey"
backend = "ollama"
model = "llama3"
api_key_file = "/etc/key"

[[instances]]
name = "cmd"
backend = "command"
command = ["srv", "{port}"]
served_model_name = "x"
context_size = 4096
""",
    )
    assert any("instances[0].args" in ln and "-c/--ctx-size" in ln and "context_size" in ln for ln in lines), lines
    assert any("instances[1].args" in ln and "--api-key" in ln and "api_key_file" in ln for ln in lines), lines
    assert any("instances[2].api_key_file" in ln and "'ollama'" in ln for ln in lines), lines
    assert any("instances[3].context_size" in ln and "'command'" in ln for ln in lines), lines


# --- empty files and reload plans ------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["", "\n\n  \t\n", "# agent config\n\n# [agent]\n"], ids=["empty", "blank", "comments"]
)
def test_an_empty_config_file_is_an_error(tmp_path: Path, text: str) -> None:
    f = tmp_path / "agent.toml"
    assert problems(tmp_path, text) == [
        f"{f}: $: empty config file (no settings at all): a truncated or half-written file? "
        "Refusing it rather than running with no instances"
    ]


def test_check_config_rejects_an_empty_file_with_78(tmp_path: Path) -> None:
    empty = tmp_path / "agent.toml"
    empty.write_text("")
    res = run_agent("check-config", str(empty))
    assert res.returncode == EX_CONFIG
    assert res.stderr.startswith(f"{empty}: $: empty config file")


def _cfg(tmp_path: Path, text: str, name: str = "agent.toml"):  # type: ignore[no-untyped-def]
    f = tmp_path / name
    f.write_text(text)
    return load_config(f)


SUP = "[supervisor]\nport_base = 20000\nport_span = 2\n"


def _inst(name: str, extra: str = "") -> str:
    return f'[[instances]]\nname = "{name}"\nbackend = "vllm"\nmodel = "{name}-m"\n{extra}\n'


def _running(cfg, ports: dict[str, int], assigned: frozenset[str] = frozenset()):  # type: ignore[no-untyped-def]
    from agent.supervisor.plan import Running

    by_name = {c.name: c for c in cfg.instances}
    return {n: Running(by_name[n], p, n in assigned) for n, p in ports.items()}


def test_reload_plan_refuses_when_the_port_span_is_exhausted(tmp_path: Path) -> None:
    from agent.supervisor.plan import PlanError, plan_reload

    sup = SUP.replace("port_span = 2", "port_span = 3")
    old = _cfg(tmp_path, BASE + sup + _inst("a") + _inst("b"))
    new = _cfg(tmp_path, BASE + sup + _inst("a") + _inst("b", 'args = ["--x"]') + _inst("c"), "new.toml")
    with pytest.raises(PlanError) as e:  # another process holds the span's third port
        plan_reload(old, new, _running(old, {"a": 20000, "b": 20001}), is_free=lambda p: p != 20002)
    assert e.value.code == "reload_not_applicable"
    assert e.value.problems == ["no free port left in 20000..20002 for instance 'c'"]


def test_instances_without_a_port_must_fit_the_span(tmp_path: Path) -> None:
    text = BASE + SUP + _inst("a") + _inst("b", "port = 20001") + _inst("c")
    assert problems(tmp_path, text) == [
        f"{tmp_path / 'agent.toml'}: $.supervisor.port_span: 2 instances have no explicit port "
        "but 20000..20001 has room for 1"
    ]


def test_reload_plan_reuses_ports_of_what_it_stops_and_keeps_changed_ports(tmp_path: Path) -> None:
    from agent.supervisor.plan import plan_reload

    old = _cfg(tmp_path, BASE + SUP + _inst("a") + _inst("b"))
    new = _cfg(tmp_path, BASE + SUP + _inst("b", 'args = ["--x"]') + _inst("c"), "new.toml")
    # The ports are held by our own servers now; they are free once the plan stops them.
    plan = plan_reload(old, new, _running(old, {"a": 20000, "b": 20001}), is_free=lambda p: False)
    assert plan.instances.summary() == {"added": ["c"], "removed": ["a"], "changed": ["b"], "unchanged": []}
    assert [(c.name, port) for c, port in plan.instances.start] == [("b", 20001), ("c", 20000)]
    assert plan.restart_needed == [] and plan.warnings == []


def test_reload_plan_refuses_an_explicit_port_in_use(tmp_path: Path) -> None:
    from agent.supervisor.plan import PlanError, plan_reload

    old = _cfg(tmp_path, BASE + SUP + _inst("a"))
    new = _cfg(tmp_path, BASE + SUP + _inst("a") + _inst("b", "port = 20000") + _inst("c", "port = 9999"), "n.toml")
    with pytest.raises(PlanError) as e:
        plan_reload(old, new, _running(old, {"a": 20000}), is_free=lambda p: p != 9999)
    assert e.value.problems == [
        "instance 'b': port 20000 is held by running instance 'a'",
        "instance 'c': port 9999 is in use by another process",
    ]


def test_reload_plan_reports_restart_only_changes_and_applies_the_rest(tmp_path: Path) -> None:
    from agent.supervisor.plan import plan_reload

    old = _cfg(tmp_path, BASE + SUP + _inst("a"))
    text = (
        BASE
        + SUP
        + "keep_servers_on_restart = false\nprobe_interval_s = 7\n"
        + '[cluster]\nendpoints = ["http://127.0.0.1:2379"]\n[proxy]\nmax_attempts = 5\nmax_body_bytes = 4096\n'
        + _inst("a")
    )
    new = _cfg(tmp_path, text, "new.toml")
    plan = plan_reload(old, new, _running(old, {"a": 20000}), is_free=lambda p: True)
    assert plan.restart_needed == ["cluster", "supervisor.keep_servers_on_restart", "proxy.max_body_bytes"]
    assert plan.warnings[0] == "[cluster] changed; restart needed to apply it"
    assert "[supervisor] keep_servers_on_restart changed; restart needed to apply it" in plan.warnings
    # The live part applies; what needs a restart keeps its running value.
    assert plan.live.supervisor.probe_interval_s == 7 and plan.live.proxy.max_attempts == 5
    assert plan.live.supervisor.keep_servers_on_restart is True
    assert plan.live.proxy.max_body_bytes == old.proxy.max_body_bytes
    assert not plan.live.cluster.enabled
    assert plan.instances.summary()["unchanged"] == ["a"]


def test_reload_plan_refuses_a_file_that_would_stop_everything_by_omission(tmp_path: Path) -> None:
    from agent.supervisor.plan import PlanError, plan_reload

    old = _cfg(tmp_path, BASE + SUP + _inst("a") + _inst("b"))
    cut = _cfg(tmp_path, BASE + SUP, "cut.toml")  # truncated after [supervisor]
    with pytest.raises(PlanError) as e:
        plan_reload(old, cut, _running(old, {"a": 20000, "b": 20001}), is_free=lambda p: True)
    assert e.value.code == "config_invalid"
    [line] = e.value.problems
    assert line.startswith(f"{tmp_path / 'cut.toml'}: $.instances: no [[instances]]")
    assert "would stop 'a', 'b'" in line and "instances = []" in line
    # Said on purpose: every instance stops.
    empty = _cfg(tmp_path, "instances = []\n" + BASE + SUP, "none.toml")
    plan = plan_reload(old, empty, _running(old, {"a": 20000, "b": 20001}), is_free=lambda p: True)
    assert plan.instances.summary()["removed"] == ["a", "b"]


def test_reload_plan_lets_a_configured_instance_take_an_assigned_ones_name(tmp_path: Path) -> None:
    from agent.supervisor.plan import plan_reload

    old = _cfg(tmp_path, BASE + SUP + _inst("a") + _inst("m"))
    new = _cfg(tmp_path, BASE + SUP + _inst("a") + _inst("m", 'args = ["--x"]'), "new.toml")
    running = _running(old, {"a": 20000, "m": 20001}, assigned=frozenset({"m"}))
    plan = plan_reload(old, new, running, is_free=lambda p: False)
    assert plan.instances.stop == ["m"]
    assert [(c.name, port) for c, port in plan.instances.start] == [("m", 20001)]


def test_check_config_notes_a_file_that_runs_nothing(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(BASE)  # valid, but what a file cut before its first [[instances]] looks like
    res = run_agent("check-config", str(f))
    assert res.returncode == 0
    assert res.stderr.strip() == f"{f}: note: no [[instances]] and no [cluster] endpoints: it runs nothing"


# --- human messages, and all problems at once ------------------------------------------------


def test_enum_errors_list_the_allowed_values(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    lines = problems(
        tmp_path,
        BASE.replace('"simulated"', '"simulatd"')
        + '[agent]\nlog_level = "verbose"\n'
        + '[[instances]]\nname = "a"\nbackend = "vlm"\nmodel = "m"\n'
        + '[[proxy.routes]]\nmodel = "m"\ntask = "video"\ninstances = ["a"]\n',
    )
    assert f"{f}: $.agent.log_level: 'verbose' is not one of 'debug', 'error', 'info', 'warning'" in lines
    assert f"{f}: $.gpu.source: 'simulatd' is not one of 'nvml', 'simulated'" in lines
    assert f"{f}: $.proxy.routes[0].task: 'video' is not one of 'document', 'image', 'text'" in lines
    [backend] = [line for line in lines if "$.instances[0].backend" in line]
    assert "'vlm' is not one of " in backend and "'vllm'" in backend and "'command'" in backend


def test_url_errors_say_how_to_write_the_url(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    lines = problems(
        tmp_path,
        BASE + '[agent]\nadvertise_url = "gpu-1:8080"\n[cluster]\nendpoints = ["127.0.0.1:2379"]\n',
    )
    assert f"{f}: $.cluster.endpoints[0]: 127.0.0.1:2379 is not a URL; write http://127.0.0.1:2379" in lines
    assert f"{f}: $.agent.advertise_url: gpu-1:8080 is not a URL; write http://gpu-1:8080" in lines


def test_cross_field_problems_come_with_type_errors(tmp_path: Path) -> None:
    """A type error in [agent] no longer hides the instances' over-commit and duplicate names
    (the README's "all at once"); a rule that reads a section with a type error is skipped."""
    f = tmp_path / "agent.toml"
    two = (
        '[[instances]]\nname = "a"\nbackend = "vllm"\nmodel = "m"\ngpus = [0]\ngpu_memory_fraction = 0.6\n'
        '[[instances]]\nname = "a"\nbackend = "vllm"\nmodel = "m"\ngpus = [0]\ngpu_memory_fraction = 0.5\n'
    )
    lines = problems(tmp_path, BASE + '[agent]\nlisten_port = "eighty"\n' + two)
    assert lines == [
        f"{f}: $.agent.listen_port: Expected `int`, got `str`",
        f"{f}: $.instances[1].name: duplicate name 'a' (also instances[0])",
        f"{f}: $.instances[1].gpu_memory_fraction: GPU 0 over-committed: a (0.6), a (0.5) sum to 1.10 "
        "> memory_budget 0.95",
    ]
    # [gpu] has a type error: the over-commit (which reads its memory_budget) is not judged.
    lines = problems(tmp_path, BASE.replace('source = "simulated"', 'source = "simulated"\nmemory_budget = "x"') + two)
    assert lines == [
        f"{f}: $.gpu.memory_budget: Expected `float`, got `str`",
        f"{f}: $.instances[1].name: duplicate name 'a' (also instances[0])",
    ]


# --- the coordinator's file: all problems at once, and warnings -------------------------------


def coordinator_check(tmp_path: Path, text: str, capfd) -> tuple[int, list[str]]:  # type: ignore[no-untyped-def]
    """``gpu-coordinator check-config`` on ``text``: (exit status, stderr lines)."""
    from coordinator.cli import main as coordinator_main

    f = tmp_path / "coordinator.toml"
    f.write_text(text)
    rc = coordinator_main(["check-config", str(f)])
    return rc, capfd.readouterr().err.splitlines()


def test_coordinator_cross_field_problems_come_with_type_errors(tmp_path: Path, capfd) -> None:  # type: ignore[no-untyped-def]
    """A type error in [coordinator] does not hide the election, etcd and degradation rules; a
    rule that reads a section with a type error is skipped (its verdict would rest on defaults)."""
    f = tmp_path / "coordinator.toml"
    rc, lines = coordinator_check(
        tmp_path,
        '[coordinator]\nlisten_port = "x"\nadvertise_url = "gpu-1:8090"\n'
        '[etcd]\nendpoints = ["http://e1:2379"]\ncluster = "Bad Name"\n'
        "[election]\nlease_ttl_s = 10\nrenew_deadline_s = 12\n"
        "[degradation]\nthresholds = [0.3, 0.1, 0.2]\n",
        capfd,
    )
    assert rc == EX_CONFIG
    assert lines[0] == f"{f}: $.coordinator.listen_port: Expected `int`, got `str`"
    assert any(line.startswith(f"{f}: $.etcd.cluster: ") for line in lines), lines
    assert f"{f}: $.election.renew_deadline_s: must be shorter than lease_ttl_s (10s): " in "\n".join(lines)
    assert f"{f}: $.degradation.thresholds: must be 3 rates, strictly increasing (levels 1, 2, 3)" in lines
    assert not any("advertise_url" in line for line in lines)  # [coordinator] did not decode: not judged
    # [etcd] has a type error: the election timing rule (which reads etcd.timeout_s) is not judged.
    rc, lines = coordinator_check(
        tmp_path,
        '[etcd]\nendpoints = ["http://e1:2379"]\ntimeout_s = "2"\n[election]\nretry_period_s = 9.5\n',
        capfd,
    )
    assert lines == [f"{f}: $.etcd.timeout_s: Expected `float`, got `str`"]


def test_coordinator_advertise_url_is_checked(tmp_path: Path, capfd) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "coordinator.toml"
    rc, lines = coordinator_check(
        tmp_path, '[coordinator]\nadvertise_url = "coord-1:8090"\n[etcd]\nendpoints = ["http://e1:2379"]\n', capfd
    )
    assert (rc, lines) == (
        EX_CONFIG,
        [f"{f}: $.coordinator.advertise_url: coord-1:8090 is not a URL; write http://coord-1:8090"],
    )
    rc, lines = coordinator_check(
        tmp_path,
        '[coordinator]\nadvertise_url = "ftp://coord-1:8090"\n[etcd]\nendpoints = ["http://e1:2379"]\n',
        capfd,
    )
    assert lines == [
        f"{f}: $.coordinator.advertise_url: ftp://coord-1:8090: the scheme must be http:// or https://, not ftp://"
    ]


@pytest.mark.parametrize(
    ("section", "warned_field"),
    [
        ('listen_host = "127.0.0.1"', "listen_host"),  # the default
        ('listen_host = "::1"\nid = "coord-1"', "listen_host"),
        ('listen_host = "localhost"\nadvertise_url = "http://127.0.0.1:8090"', "listen_host"),
        ('listen_host = "0.0.0.0"\nadvertise_url = "http://localhost:8090"', "advertise_url"),
        ('listen_host = "127.0.0.1"\nadvertise_url = "https://coord-1.example:443"', None),  # a proxy in front
        ('listen_host = "0.0.0.0"', None),
    ],
)
def test_coordinator_check_config_warns_of_loopback(  # type: ignore[no-untyped-def]
    section: str, warned_field: str | None, tmp_path: Path, capfd
) -> None:
    f = tmp_path / "coordinator.toml"
    rc, lines = coordinator_check(
        tmp_path, f'[coordinator]\n{section}\n[etcd]\nendpoints = ["http://e1:2379"]\n', capfd
    )
    assert rc == 0  # a warning, not a failure
    if warned_field is None:
        assert lines == []
    else:
        [warning] = lines
        assert warning.startswith(f"{f}: warning: $.coordinator.{warned_field}: ")
        assert "loopback" in warning


def test_the_coordinator_warns_of_loopback_at_start_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import structlog
    from structlog.testing import capture_logs

    import coordinator.daemon
    import gpufleet.logsetup
    from coordinator.cli import main as coordinator_main

    class Runtime:  # stands in for the daemon: only the start-up warning is wanted
        def __init__(self, cfg: object) -> None:
            pass

        async def run(self) -> int:
            return 0

    monkeypatch.setattr(coordinator.daemon, "CoordinatorRuntime", Runtime)
    monkeypatch.setattr(gpufleet.logsetup, "configure_logging", lambda *a, **k: None)  # keep capture_logs'
    monkeypatch.setattr(structlog.contextvars, "bind_contextvars", lambda **kw: None)  # bound for the test only
    f = tmp_path / "coordinator.toml"
    f.write_text(
        '[coordinator]\nlisten_host = "127.0.0.1"\nlog_format = "json"\n[etcd]\nendpoints = ["http://e1:2379"]\n'
    )
    with capture_logs() as logs:
        assert coordinator_main(["run", "--config", str(f)]) == 0
    [warning] = [e for e in logs if e["event"] == "config_warning"]
    assert warning["log_level"] == "warning" and warning["field"] == "$.coordinator.listen_host"


def test_nvml_timeout_s_and_its_deprecated_name(tmp_path: Path) -> None:
    """[gpu] probe_timeout_s was the NVML deadline, easy to mistake for [supervisor]
    probe_timeout_s: renamed nvml_timeout_s; the old name still loads, with a warning, and
    both at once is an error naming the field."""
    from agent.config import config_warnings

    f = tmp_path / "agent.toml"
    f.write_text(BASE.replace('source = "simulated"', 'source = "simulated"\nnvml_timeout_s = 3.0'))
    cfg = load_config(f)
    assert (cfg.gpu.nvml_timeout_s, cfg.gpu.probe_timeout_s) == (3.0, None)
    assert config_warnings(cfg) == []
    f.write_text(BASE.replace('source = "simulated"', 'source = "simulated"\nprobe_timeout_s = 4.0'))
    cfg = load_config(f)
    assert cfg.gpu.nvml_timeout_s == 4.0
    [warning] = [w.format(f) for w in config_warnings(cfg)]
    assert warning == (
        f"{f}: $.gpu.probe_timeout_s: is deprecated: rename it nvml_timeout_s (the NVML read deadline; "
        "[supervisor] probe_timeout_s is the health probe's timeout)"
    )
    both = 'source = "simulated"\nprobe_timeout_s = 4.0\nnvml_timeout_s = 3.0'
    assert problems(tmp_path, BASE.replace('source = "simulated"', both)) == [
        f"{f}: $.gpu.probe_timeout_s: is the deprecated name of nvml_timeout_s, also given: keep only nvml_timeout_s"
    ]


def test_check_config_warns_of_the_deprecated_nvml_timeout_name(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(
        BASE.replace('source = "simulated"', 'source = "simulated"\nprobe_timeout_s = 4.0')
        + '[[instances]]\nname = "a"\nbackend = "vllm"\nmodel = "m"\n'
    )
    res = run_agent("check-config", str(f))
    assert res.returncode == 0, res.stderr
    assert f"{f}: warning: $.gpu.probe_timeout_s: is deprecated: rename it nvml_timeout_s" in res.stderr


def test_task_routes_and_their_deprecated_names(tmp_path: Path) -> None:
    """[proxy] routes / route_fallback are the task routes: renamed task_routes /
    task_route_fallback, since "routes" alone is the cluster's route table. The old names still
    load, warn, and name themselves in problems; both names at once is an error."""
    from agent.config import config_warnings

    inst = '[[instances]]\nname = "a"\nbackend = "vllm"\nmodel = "m"\n'
    route = 'model = "m"\ntask = "image"\ninstances = ["{}"]\n'
    f = tmp_path / "agent.toml"
    f.write_text(BASE + inst + "[proxy]\ntask_route_fallback = false\n[[proxy.task_routes]]\n" + route.format("a"))
    cfg = load_config(f)
    assert [r.instances for r in cfg.proxy.task_routes] == [["a"]] and cfg.proxy.task_route_fallback is False
    assert config_warnings(cfg) == []
    f.write_text(BASE + inst + "[proxy]\nroute_fallback = false\n[[proxy.routes]]\n" + route.format("a"))
    cfg = load_config(f)
    assert [r.instances for r in cfg.proxy.task_routes] == [["a"]] and cfg.proxy.task_route_fallback is False
    assert [w.format(f) for w in config_warnings(cfg)] == [
        f"{f}: $.proxy.routes: is deprecated: rename it task_routes (routes alone is the cluster's route table)",
        f"{f}: $.proxy.route_fallback: is deprecated: rename it task_route_fallback (the fallback of the task routes)",
    ]
    assert problems(tmp_path, BASE + inst + "[[proxy.routes]]\n" + route.format("b")) == [
        f"{f}: $.proxy.routes[0].instances: no instance named 'b'"
    ]
    assert problems(tmp_path, BASE + inst + "[[proxy.task_routes]]\n" + route.format("b")) == [
        f"{f}: $.proxy.task_routes[0].instances: no instance named 'b'"
    ]
    both = "[proxy]\nroute_fallback = true\ntask_route_fallback = false\n"
    assert problems(tmp_path, BASE + inst + both) == [
        f"{f}: $.proxy.route_fallback: is the deprecated name of task_route_fallback, also given: "
        "keep only task_route_fallback"
    ]
