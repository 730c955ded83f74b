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
    assert "$.etcd.endpoints[0]: Expected `str` matching regex" in str(e.value)
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
