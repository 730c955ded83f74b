"""``[auth]``: the default follows the listen address (open on loopback only), and every
combination that would leave a reachable agent without keys, or a cluster without hop trust,
is a config error naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import config_warnings, load_config
from gpufleet.tomlconfig import ConfigError

BASE = """
[agent]
listen_host = "{host}"
[gpu]
source = "simulated"
[[gpu.simulated]]
[supervisor]
"""


def write(tmp_path: Path, host: str, extra: str = "") -> Path:
    p = tmp_path / "agent.toml"
    p.write_text("instances = []\n" + BASE.format(host=host) + extra)
    return p


def problems(tmp_path: Path, host: str, extra: str = "") -> dict[str, str]:
    try:
        load_config(write(tmp_path, host, extra))
    except ConfigError as e:
        return {p.path: p.message for p in e.problems}
    return {}


CLUSTER = '[cluster]\nendpoints = ["http://127.0.0.1:2379"]\n'


def test_loopback_is_open_by_default(tmp_path: Path) -> None:
    assert problems(tmp_path, "127.0.0.1") == {}
    assert problems(tmp_path, "127.0.0.1", CLUSTER) == {}


def test_reachable_agents_need_keys_unless_they_say_open(tmp_path: Path) -> None:
    got = problems(tmp_path, "0.0.0.0")
    assert "reachable from other hosts" in got["$.auth.keys_file"]
    assert "gpuctl keys create" in got["$.auth.keys_file"]
    got = problems(tmp_path, "0.0.0.0", CLUSTER)
    assert "openssl rand -hex 32" in got["$.auth.hop_secret_file"]
    assert problems(tmp_path, "0.0.0.0", '[auth]\nkeys_file = "keys.json"\n') == {}
    assert problems(tmp_path, "0.0.0.0", CLUSTER + '[auth]\nhop_secret_file = "hop"\n') == {}


def test_open_on_a_reachable_address_loads_with_a_warning(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "0.0.0.0", '[auth]\nmode = "open"\n'))
    warned = {w.path: w.message for w in config_warnings(cfg)}
    assert "anyone who can reach this port" in warned["$.auth.mode"]
    cfg = load_config(write(tmp_path, "127.0.0.1", '[auth]\nmode = "open"\n'))
    assert "$.auth.mode" not in {w.path for w in config_warnings(cfg)}


def test_cluster_keys_come_from_etcd_not_a_file(tmp_path: Path) -> None:
    got = problems(tmp_path, "127.0.0.1", CLUSTER + '[auth]\nkeys_file = "k.json"\n')
    assert "from etcd" in got["$.auth.keys_file"]


def test_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "0.0.0.0", '[auth]\nkeys_file = "keys.json"\n'))
    assert cfg.auth.keys_file == str(tmp_path / "keys.json")


@pytest.mark.parametrize("bad", ['mode = "closed"', "keys_file = 3", "token = 1"])
def test_bad_auth_values_name_the_field(tmp_path: Path, bad: str) -> None:
    got = problems(tmp_path, "127.0.0.1", f"[auth]\n{bad}\n")
    assert any(path.startswith("$.auth") for path in got), got
