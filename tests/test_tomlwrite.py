"""The one TOML writer (gpufleet.tomlwrite): what is written is what is read back."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from helpers import agent_toml, cluster_toml, instance_toml

from gpufleet.tomlwrite import dumps
from gpufleet_dev import demo

AWKWARD = ["plain", 'a "quoted" word', "back\\slash", "C:\\new\\table", "line\nbreak", "tab\there", "ünïcode °C", "#"]


@pytest.mark.parametrize("value", AWKWARD)
def test_values_round_trip(value: str) -> None:
    doc = {"section": {"key": value, "list": [value, 1, 2.5, True], "path": Path("/x") / value}}
    back = tomllib.loads(dumps(doc, comment="generated"))
    assert back == {"section": {"key": value, "list": [value, 1, 2.5, True], "path": f"/x/{value}"}}


def test_none_is_left_out() -> None:
    assert tomllib.loads(dumps({"a": {"x": None, "y": 1}})) == {"a": {"y": 1}}


def test_test_builders_escape_what_they_are_given(tmp_path: Path) -> None:
    tmp = tmp_path / 'a "b" \\ c'
    tmp.mkdir()
    text = agent_toml(tmp, 8080, instance_toml("m", model='/models/"q"\\m')) + cluster_toml(['http://h"1:2379'], 'c"l')
    doc = tomllib.loads(text)
    assert doc["agent"]["state_dir"] == str(tmp / "state")
    assert doc["instances"][0]["model"] == '/models/"q"\\m'
    assert doc["cluster"]["endpoints"] == ['http://h"1:2379'] and doc["cluster"]["cluster"] == 'c"l'


def test_demo_configs_escape_what_they_are_given(tmp_path: Path) -> None:
    work = tmp_path / 'x"\\y'
    agent = tomllib.loads(demo._agent_config('n"1', "NVIDIA A100-SXM4-80GB", ["m.1"], 7010, 'http://e"\\', work))
    assert agent["agent"]["node_id"] == 'n"1' and agent["agent"]["state_dir"] == str(work / "state")
    assert agent["cluster"]["endpoints"] == ['http://e"\\']
    coord = tomllib.loads(demo._coordinator_config('c"1', 7020, "http://e", work / "admin-token"))
    assert coord["coordinator"]["id"] == 'c"1' and coord["coordinator"]["admin_token_file"] == str(work / "admin-token")
