"""The model registry's rules and the agent's path checks, without a cluster: validation of
entries, hostile names and paths, memory shares, size/sha256 checks, assignment → instance."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import msgspec
import pytest
from helpers import agent_toml, free_port

from agent.cluster.assignments import instance_config, outside_roots
from agent.cluster.publish_policy import PublishPolicy, change_reason
from agent.config import ModelsSection, load_config
from coordinator.config import load_config as load_coordinator_config
from gpufleet.keyspace import assigned_instance_name
from gpufleet.keyspace.records import (
    AssignedInstance,
    GpuRecord,
    ModelAvailability,
    ModelRecord,
    NodeRecord,
    ProxyCounters,
)
from gpufleet.registry import GIB, check_path, memory_share, model_digest, model_size, path_problems, validate_model
from gpufleet.tomlconfig import ConfigError


def model(**kw: object) -> ModelRecord:
    return msgspec.structs.replace(ModelRecord(name="qwen", path="/mnt/models/qwen"), **kw)


def test_a_good_entry_has_no_problems() -> None:
    assert validate_model(model(classes=["A100", "H100"], sha256="a" * 64, fallback="small", replicas=3)) == []


@pytest.mark.parametrize(
    ("change", "field", "text"),
    [
        ({"name": "../etc"}, "name", "invalid model name"),
        ({"name": "a//b"}, "name", "invalid model name"),
        ({"path": "models/qwen"}, "path", "not absolute"),
        ({"path": "/mnt/models/../../etc/shadow"}, "path", "not normalised"),
        ({"path": "/mnt/./models"}, "path", "not normalised"),
        ({"path": "/mnt//models"}, "path", "not normalised"),
        ({"path": "/mnt/models/"}, "path", "not normalised"),
        ({"path": "/"}, "path", "root directory"),
        ({"path": "/mnt/a\nb"}, "path", "newline"),
        ({"replicas": -1}, "replicas", "between 0 and 1000"),
        ({"min_vram_gib": 0.0}, "min_vram_gib", "more than 0"),
        ({"gpu_memory_fraction": 1.5}, "gpu_memory_fraction", "at most 1"),
        ({"classes": ["A100; rm -rf /"]}, "classes", "invalid GPU class"),
        ({"sha256": "ABC"}, "sha256", "64 lowercase hex"),
        ({"size_bytes": -5}, "size_bytes", "negative"),
        ({"fallback": "qwen"}, "fallback", "own fallback"),
        ({"fallback": "../x"}, "fallback", "invalid model name"),
        ({"args": ["--x\n--y"]}, "args", "newline"),
    ],
)
def test_bad_entries_name_the_field(change: dict[str, object], field: str, text: str) -> None:
    problems = validate_model(model(**change))
    assert any(p.startswith(f"{field}:") and text in p for p in problems), problems


def test_an_unknown_backend_in_etcd_fails_to_decode() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"name": "x", "path": "/m/x", "backend": "sh"}', type=ModelRecord)


@pytest.mark.parametrize("name", ["qwen", "Qwen/Qwen3-32B", "qwen3:32b", "a" * 128, "x@v1+fp8"])
def test_assigned_instance_names_are_safe_file_names(name: str) -> None:
    inst = assigned_instance_name(name)
    assert inst.startswith("m-") and len(inst) <= 63 and "/" not in inst and ":" not in inst
    cfg = instance_config(
        AssignedInstance(name=inst, model=name, path="/m/x", backend="vllm", gpus=[0]), ModelsSection()
    )
    assert cfg.name == inst and cfg.client_model == name


def test_assigned_instance_names_differ_for_similar_models() -> None:
    assert assigned_instance_name("a/b") != assigned_instance_name("a:b") != assigned_instance_name("a-b")


@pytest.mark.parametrize("bad", ["../../etc/cron.d/x", "a/b", ".hidden", ""])
def test_a_hostile_assignment_name_is_refused(bad: str) -> None:
    a = AssignedInstance(name=bad, model="m", path="/m/x", backend="vllm", gpus=[0])
    with pytest.raises(msgspec.ValidationError):
        instance_config(a, ModelsSection())


def test_allowed_roots() -> None:
    roots = ["/mnt/models"]
    assert not outside_roots("/mnt/models/qwen", roots)
    assert outside_roots("/mnt/models-evil/qwen", roots)  # a prefix of the string is not the directory
    assert outside_roots("/etc/shadow", roots)
    assert not outside_roots("/anything", [])


def test_memory_share() -> None:
    total = 80 * GIB
    assert memory_share(model(min_vram_gib=30), total) == (0.38, int(0.38 * total))
    assert memory_share(model(), total) == (0.9, int(0.9 * total))
    assert memory_share(model(gpu_memory_fraction=0.5, min_vram_gib=50), total) == (0.5, 50 * GIB)
    assert memory_share(model(min_vram_gib=200), total)[0] == 1.0


def test_path_checks(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + os.urandom(100))
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    assert check_path(str(f)).available
    assert check_path(str(f), 104, digest) == check_path(str(f), None, digest)
    assert check_path(str(f), 104, digest).verified
    wrong_size = check_path(str(f), 5)
    assert not wrong_size.available and "size 104 bytes, registered 5" in (wrong_size.error or "")
    wrong_sum = check_path(str(f), None, "0" * 64)
    assert not wrong_sum.available and "sha256" in (wrong_sum.error or "")
    missing = check_path(str(tmp_path / "nope"))
    assert not missing.available and "No such file" in (missing.error or "")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no files" in (check_path(str(empty)).error or "")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "not a regular file" in (check_path(str(fifo)).error or "")


def test_directory_size_and_digest_ignore_walk_order(tmp_path: Path) -> None:
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    for name, data in (("b.bin", b"bb"), ("a.json", b"{}"), ("sub/c", b"ccc")):
        (d / name).write_bytes(data)
    manifest = "".join(
        f"{hashlib.sha256((d / rel).read_bytes()).hexdigest()}  {rel}\n" for rel in ("a.json", "b.bin", "sub/c")
    )
    assert model_digest(str(d)) == hashlib.sha256(manifest.encode()).hexdigest()
    assert model_size(str(d)) == 7
    assert check_path(str(d), 7, model_digest(str(d))).verified


def test_path_problems_accepts_normal_paths() -> None:
    assert path_problems("/mnt/ceph/models/qwen3-32b") == []


def test_agent_models_section_is_validated(tmp_path: Path) -> None:
    text = agent_toml(tmp_path, free_port(), "") + '\n[models]\nlaunchers = { sh = ["/bin/sh"], vllm = [] }\n'
    text += 'allowed_roots = ["relative/dir"]\n'
    (tmp_path / "agent.toml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "agent.toml")
    msg = str(e.value)
    assert "$.models.launchers.sh: unknown backend" in msg
    assert "$.models.launchers.vllm: must not be empty" in msg
    assert "$.models.allowed_roots[0]" in msg and "not absolute" in msg


def test_coordinator_degradation_thresholds_are_validated(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    etcd = '[etcd]\nendpoints = ["http://127.0.0.1:2379"]\n'
    p.write_text(etcd + "[degradation]\nthresholds = [0.3, 0.2, 0.5]\n")
    with pytest.raises(ConfigError) as e:
        load_coordinator_config(p)
    assert "$.degradation.thresholds: must be 3 rates, strictly increasing" in str(e.value)
    p.write_text(etcd + "[placement]\nreschedule_after_s = -1\n")
    with pytest.raises(ConfigError) as e:
        load_coordinator_config(p)
    assert "$.placement.reschedule_after_s" in str(e.value)


def _node(**kw: object) -> NodeRecord:
    base = NodeRecord(
        node="n1", address="http://n1", agent_version="x", started_at=1.0, updated_at=2.0,
        gpu_source="simulated", gpu_classes=[], gpus=[], instances=[],
    )  # fmt: skip
    return msgspec.structs.replace(base, **kw)


def test_publish_policy_model_availability_is_urgent_counters_are_telemetry() -> None:
    p = PublishPolicy()
    before = _node(models=[ModelAvailability(model="m", path="/m", available=None)])
    after = _node(models=[ModelAvailability(model="m", path="/m", available=False, error="gone")])
    change = change_reason(before, after, p)
    assert change is not None and change.urgent and "availability" in change.reason
    counted = _node(proxy=ProxyCounters(attempts=10, attempt_errors=1))
    change = change_reason(_node(proxy=ProxyCounters()), counted, p)
    assert change is not None and not change.urgent
    assert change_reason(counted, counted, p) is None


def test_publish_policy_crossing_the_temperature_cap_is_urgent() -> None:
    p = PublishPolicy()

    def hot(temp: float) -> NodeRecord:
        gpu = GpuRecord(index=0, uuid="u", name="A100", gpu_class="A100", temperature_celsius=temp)
        return _node(gpus=[gpu])

    change = change_reason(hot(84), hot(86), p)
    assert change is not None and change.urgent and "over 85" in change.reason
    change = change_reason(hot(88), hot(84), p)
    assert change is not None and change.urgent and "back under 85" in change.reason
    change = change_reason(hot(60), hot(63), p)
    assert change is not None and not change.urgent  # an ordinary telemetry change
