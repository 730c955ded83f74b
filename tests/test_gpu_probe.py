"""GPU probe: class table, NVML source, simulated source.

The NVML tests use a stand-in for the pynvml functions because CI has no GPU: they replace
attributes of the real, imported ``pynvml`` module and raise the library's real ``NVMLError``
subclasses, so the error handling is exercised as on a GPU host. The real library is exercised
on GPU hosts (and ``test_real_nvml_without_driver_is_unavailable`` runs it here, with no driver).
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pynvml
import pytest
from structlog.testing import capture_logs

import agent.gpu
from agent.config import GpuScriptStep, GpuSection, SimulatedGpu
from agent.gpu import GpuSource, GpuSourceUnavailable, classify_gpu, open_gpu_source
from agent.gpu.simulated import GIB, SimulatedSource
from gpufleet.keyspace.records import (
    LINK_HOST_BRIDGE,
    LINK_NUMA_NODE,
    LINK_NVLINK,
    LINK_PCIE_SWITCH,
    LINK_PCIE_SWITCHES,
    LINK_SYSTEM,
    LINK_UNKNOWN,
)

# --- class table ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100 80GB PCIe", "A100"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L40", "L40"),
        ("NVIDIA GeForce RTX 4090", "RTX4090"),
        ("NVIDIA GeForce RTX 3090", "RTX3090"),
        ("NVIDIA RTX A6000", "RTXA6000"),
        ("NVIDIA RTX 6000 Ada Generation", "RTX6000ADA"),
        ("Tesla T4", "T4"),
        ("Tesla V100-SXM2-32GB", "V100"),
        ("NVIDIA A30", "A30"),
        ("NVIDIA A40", "A40"),
        ("NVIDIA H20", "H20"),
        ("NVIDIA H800", "H800"),
        ("NVIDIA A800-SXM4-80GB", "A800"),
        ("NVIDIA L20", "L20"),
        ("NVIDIA GeForce RTX 5090", "RTX5090"),
        ("NVIDIA RTX PRO 6000 Blackwell Server Edition", "RTXPRO6000"),
        ("NVIDIA GB200", "GB200"),
        ("NVIDIA H200 NVL", "H200"),
        ("  nvidia   a10g ", "A10G"),  # case and spacing do not matter
        ("NVIDIA RTX A4000", "UNKNOWN"),  # must not read as A40
        ("Matrox G200", "UNKNOWN"),
    ],
)
def test_classify(name: str, cls: str) -> None:
    assert classify_gpu(name) == cls


def test_base_weights_keep_the_article_and_follow_bandwidth() -> None:
    from gpufleet.gpuclasses import BASE_WEIGHTS, CLASSES

    # The gateway article's A10/A100/H100 numbers (docs/sources.md) are the contract; every other
    # class comes from one measure.
    assert (BASE_WEIGHTS["A10"], BASE_WEIGHTS["A100"], BASE_WEIGHTS["H100"]) == (100, 220, 380)
    assert BASE_WEIGHTS["B200"] > BASE_WEIGHTS["H200"] > BASE_WEIGHTS["H100"] > BASE_WEIGHTS["A100"]
    assert BASE_WEIGHTS["L4"] < BASE_WEIGHTS["A10"] < BASE_WEIGHTS["L40S"] < BASE_WEIGHTS["A100"]
    by_bandwidth = sorted((c for c in CLASSES if c.article_base is None), key=lambda c: c.bandwidth_gbs)
    weights = [c.base_weight for c in by_bandwidth]
    assert weights == sorted(weights)  # monotonic in the measure
    assert len({c.name for c in CLASSES}) == len(CLASSES)


def test_classify_overrides_first_in_order() -> None:
    overrides = {"rtx a4000": "A4000", "a4000": "never-reached", "a100": "BIG"}
    assert classify_gpu("NVIDIA RTX A4000", overrides) == "A4000"
    assert classify_gpu("NVIDIA A100-SXM4-80GB", overrides) == "BIG"
    assert classify_gpu("NVIDIA L4", overrides) == "L4"  # no override matches: built-in table


# --- NVML through a stand-in ---------------------------------------------------------------------


def nvml_error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)  # returns the specific subclass, e.g. NVMLError_GpuIsLost


class FakeNvml:
    """Per GPU a dict of field -> value; an exception value is raised by that NVML call."""

    def __init__(self, gpus: list[dict]) -> None:
        self.gpus = gpus
        self.init_error: Exception | None = None
        self.count_calls = 0
        self.hang = threading.Event()  # set: the temperature read blocks until `release` is set
        self.release = threading.Event()
        self.shutdowns = 0
        # Interconnect: NVLink pairs, and NVML's common-ancestor level per pair (else SYSTEM).
        self.nvlink: set[tuple[int, int]] = set()
        self.ancestor: dict[tuple[int, int], int] = {}
        self.p2p_error: Exception | None = None
        self.ancestor_error: Exception | None = None
        self.topology_calls = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for fn in [
            "nvmlInit",
            "nvmlShutdown",
            "nvmlDeviceGetCount",
            "nvmlDeviceGetHandleByIndex",
            "nvmlDeviceGetUUID",
            "nvmlDeviceGetName",
            "nvmlDeviceGetMemoryInfo",
            "nvmlDeviceGetUtilizationRates",
            "nvmlDeviceGetTemperature",
            "nvmlDeviceGetPowerUsage",
            "nvmlDeviceGetP2PStatus",
            "nvmlDeviceGetTopologyCommonAncestor",
            "nvmlDeviceGetPciInfo",
            "nvmlDeviceGetNvLinkState",
            "nvmlDeviceGetNvLinkRemotePciInfo",
        ]:
            monkeypatch.setattr(pynvml, fn, getattr(self, fn))

    def _field(self, handle: int, key: str):
        value = self.gpus[handle][key]
        if isinstance(value, Exception):
            raise value
        return value

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        self.count_calls += 1
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._field(index, "handle")
        return index

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self._field(h, "uuid")

    def nvmlDeviceGetName(self, h: int) -> str | bytes:
        return self._field(h, "name")

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        total, used = self._field(h, "memory")
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=self._field(h, "util"), memory=0)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        if self.hang.is_set():
            self.release.wait(10)
        return self._field(h, "temp")

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return self._field(h, "power_mw")

    def nvmlDeviceGetP2PStatus(self, h1: int, h2: int, index: int) -> int:
        assert index == pynvml.NVML_P2P_CAPS_INDEX_NVLINK
        self.topology_calls += 1
        if self.p2p_error is not None:
            raise self.p2p_error
        linked = (min(h1, h2), max(h1, h2)) in self.nvlink
        return pynvml.NVML_P2P_STATUS_OK if linked else pynvml.NVML_P2P_STATUS_NOT_SUPPORTED

    def nvmlDeviceGetTopologyCommonAncestor(self, h1: int, h2: int) -> int:
        self.topology_calls += 1
        if self.ancestor_error is not None:
            raise self.ancestor_error
        return self.ancestor.get((min(h1, h2), max(h1, h2)), pynvml.NVML_TOPOLOGY_SYSTEM)

    def nvmlDeviceGetPciInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(busId=f"00000000:{0x10 + h:02X}:00.0".encode())

    def _peers(self, h: int) -> list[int]:
        return sorted({b if a == h else a for a, b in self.nvlink if h in (a, b)})

    def nvmlDeviceGetNvLinkState(self, h: int, link: int) -> int:
        if not self._peers(h):
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)  # a GPU without NVLink
        if link >= len(self._peers(h)):
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return pynvml.NVML_FEATURE_ENABLED

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h: int, link: int) -> SimpleNamespace:
        # A shorter domain and lower case, as some drivers write it: compared as numbers.
        return SimpleNamespace(busId=f"0000:{0x10 + self._peers(h)[link]:02x}:00.0")


def healthy_gpu(i: int, name: str | bytes = "NVIDIA H100 80GB HBM3") -> dict:
    return {
        "handle": None,
        "uuid": f"GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd",
        "name": name,
        "memory": (80 * GIB, 10 * GIB),
        "util": 37,
        "temp": 55,
        "power_mw": 312_500,
    }


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    f = FakeNvml([healthy_gpu(0), healthy_gpu(1, name=b"NVIDIA A10G")])
    f.install(monkeypatch)
    yield f
    f.release.set()  # let a deliberately hung worker thread finish


def nvml_source(timeout: float = 5.0) -> GpuSource:
    return open_gpu_source(GpuSection(source="nvml", nvml_timeout_s=timeout))


async def test_nvml_two_healthy_gpus(fake: FakeNvml) -> None:
    src = nvml_source()
    assert src.kind == "nvml"
    recs = await src.sample()
    assert [r.index for r in recs] == [0, 1]
    a, b = recs
    assert a.uuid == "GPU-00000000-aaaa-bbbb-cccc-dddddddddddd"
    assert (a.name, a.gpu_class) == ("NVIDIA H100 80GB HBM3", "H100")
    assert (b.name, b.gpu_class) == ("NVIDIA A10G", "A10G")  # bytes from old pynvml decoded
    assert a.memory_total_bytes == 80 * GIB
    assert a.memory_used_bytes == 10 * GIB
    assert a.memory_free_bytes == 70 * GIB
    assert a.utilization_percent == 37.0
    assert a.temperature_celsius == 55.0
    assert a.power_watts == pytest.approx(312.5)  # milliwatts -> watts
    assert not a.lost and a.errors == {} and b.errors == {}
    src.close()
    assert fake.shutdowns == 1


async def test_nvml_static_fields_read_once(fake: FakeNvml) -> None:
    src = nvml_source()
    await src.sample()
    fake.gpus[0]["uuid"] = nvml_error(pynvml.NVML_ERROR_UNKNOWN)  # would show if read again
    (a, _) = await src.sample()
    assert a.uuid.startswith("GPU-00000000") and a.errors == {}


async def test_nvml_one_field_unsupported(fake: FakeNvml) -> None:
    fake.gpus[0]["power_mw"] = nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
    src = nvml_source()
    a, b = await src.sample()
    assert a.power_watts is None
    assert a.errors == {"power": "Not Supported"}
    assert a.temperature_celsius == 55.0 and a.memory_used_bytes == 10 * GIB and a.utilization_percent == 37.0
    assert b.power_watts == pytest.approx(312.5) and b.errors == {}


async def test_nvml_gpu_lost_others_still_reported(fake: FakeNvml) -> None:
    src = nvml_source()
    await src.sample()  # learn the identities first
    fake.gpus[0]["memory"] = nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
    a, b = await src.sample()
    assert a.lost is True
    assert a.uuid == "GPU-00000000-aaaa-bbbb-cccc-dddddddddddd"  # kept from the last good sample
    assert a.gpu_class == "H100"
    assert a.errors == {"device": "GPU is lost"}
    assert a.memory_used_bytes is None and a.temperature_celsius is None
    assert b.lost is False and b.errors == {} and b.temperature_celsius == 55.0


async def test_nvml_lost_or_no_handle_before_identity_known(fake: FakeNvml) -> None:
    fake.gpus[0]["uuid"] = nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
    fake.gpus[1]["handle"] = nvml_error(pynvml.NVML_ERROR_UNKNOWN)
    a, b = await nvml_source().sample()
    assert (a.lost, a.uuid, a.name, a.gpu_class) == (True, "unknown", "unknown", "UNKNOWN")
    assert b.lost is False and b.uuid == "unknown" and "device" in b.errors


async def test_nvml_library_not_found_is_unavailable_without_fallback(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.init_error = nvml_error(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    assert isinstance(fake.init_error, pynvml.NVMLError_LibraryNotFound)
    built = []
    monkeypatch.setattr(agent.gpu, "SimulatedSource", lambda *a, **k: built.append(a))
    # Simulated GPUs declared too (config validation forbids it, but even so): no fallback.
    cfg = GpuSection(source="nvml", simulated=[SimulatedGpu()])
    with pytest.raises(GpuSourceUnavailable) as exc:
        open_gpu_source(cfg)
    msg = str(exc.value)
    assert "NVML is not available (NVML Shared Library Not Found)" in msg
    assert "no NVIDIA driver" in msg and 'source = "simulated"' in msg
    assert built == []


async def test_nvml_hung_read_times_out_without_blocking_loop(fake: FakeNvml) -> None:
    src = nvml_source(timeout=0.2)
    await src.sample()
    fake.hang.set()

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    started = time.monotonic()
    recs = await src.sample()
    took = time.monotonic() - started
    t.cancel()
    assert took < 1.0
    assert ticks >= 5  # the loop kept running while NVML was stuck
    assert [r.index for r in recs] == [0, 1]
    assert recs[0].uuid.startswith("GPU-00000000")
    assert recs[0].errors == {"probe": "timeout after 0.2s (NVML call hung)"}
    assert recs[0].temperature_celsius is None

    # Still hung: no second thread piles up behind the first.
    calls = fake.count_calls
    recs = await src.sample()
    assert fake.count_calls == calls and "probe" in recs[1].errors

    fake.hang.clear()
    fake.release.set()
    await asyncio.sleep(0.05)  # the stuck read finishes
    recs = await src.sample()
    assert recs[0].errors == {} and recs[0].temperature_celsius == 55.0


def test_real_nvml_without_driver_is_unavailable() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this host")
    with pytest.raises(GpuSourceUnavailable, match=r'set \[gpu\] source = "simulated"'):
        open_gpu_source(GpuSection(source="nvml"))


# --- simulated -----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sim_cfg(*gpus: SimulatedGpu, classes: dict[str, str] | None = None) -> GpuSection:
    return GpuSection(source="simulated", simulated=list(gpus), classes=classes or {})


async def test_simulated_basic_records() -> None:
    cfg = sim_cfg(
        SimulatedGpu(memory_total_gib=80, memory_used_gib=2),
        SimulatedGpu(name="NVIDIA L4", memory_total_gib=24, uuid="GPU-fixed"),
        classes={"l4": "L4-custom"},
    )
    src = open_gpu_source(cfg, clock=FakeClock())
    assert src.kind == "simulated" and isinstance(src, GpuSource)
    a, b = await src.sample()
    assert a.index == 0 and a.uuid.startswith("GPU-sim-") and a.uuid.endswith("-0")
    assert a.gpu_class == "A100"
    assert (a.memory_total_bytes, a.memory_used_bytes, a.memory_free_bytes) == (80 * GIB, 2 * GIB, 78 * GIB)
    assert (a.temperature_celsius, a.utilization_percent, a.power_watts) == (40.0, 0.0, 60.0)
    assert (b.uuid, b.gpu_class) == ("GPU-fixed", "L4-custom")
    # deterministic UUIDs: a restarted agent reports the same GPU
    assert (await open_gpu_source(cfg).sample())[0].uuid == a.uuid


async def test_simulated_script_steps_follow_clock() -> None:
    clock = FakeClock()
    gpu = SimulatedGpu(
        script=[
            GpuScriptStep(at_s=30, lost=True),  # declared out of order on purpose
            GpuScriptStep(at_s=10, temperature_c=85, utilization_percent=90),
            GpuScriptStep(at_s=20, power_w=300, memory_used_gib=40),
        ]
    )
    src = open_gpu_source(sim_cfg(gpu), clock=clock)
    clock.now += 9.9
    (r,) = await src.sample()
    assert r.temperature_celsius == 40.0
    clock.now += 0.1
    (r,) = await src.sample()
    assert (r.temperature_celsius, r.utilization_percent, r.power_watts) == (85.0, 90.0, 60.0)
    clock.now += 15  # 25 s: the 20 s step applies
    (r,) = await src.sample()
    assert r.power_watts == 300.0 and r.memory_used_bytes == 40 * GIB and r.temperature_celsius == 85.0
    clock.now += 100  # past the last step
    (r,) = await src.sample()
    assert r.lost is True


async def test_simulated_set_state() -> None:
    src = open_gpu_source(sim_cfg(SimulatedGpu(), SimulatedGpu()), clock=FakeClock())
    assert isinstance(src, SimulatedSource)
    src.set_state(1, temperature_c=91.5, utilization_percent=100, memory_used_gib=8)
    a, b = await src.sample()
    assert a.temperature_celsius == 40.0
    assert (b.temperature_celsius, b.utilization_percent, b.memory_used_bytes) == (91.5, 100.0, 8 * GIB)
    with pytest.raises(IndexError):
        src.set_state(2, temperature_c=50)
    with pytest.raises(ValueError, match="utilization"):
        src.set_state(0, utilization_percent=101)
    with pytest.raises(ValueError, match="memory_used_gib"):
        src.set_state(0, memory_used_gib=81)


async def test_simulated_process_memory() -> None:
    src = open_gpu_source(
        sim_cfg(SimulatedGpu(memory_total_gib=80, memory_used_gib=1), SimulatedGpu(memory_total_gib=24)),
        clock=FakeClock(),
    )
    src.set_process_memory("llama", {0: 30 * GIB, 1: 10 * GIB})
    src.set_process_memory("qwen", {0: 20 * GIB})
    a, b = await src.sample()
    assert (a.memory_used_bytes, a.memory_free_bytes) == (51 * GIB, 29 * GIB)
    assert b.memory_used_bytes == 10 * GIB
    src.set_process_memory("llama", {0: 5 * GIB})  # replaces llama's previous amounts
    a, b = await src.sample()
    assert a.memory_used_bytes == 26 * GIB and b.memory_used_bytes == 0
    src.set_process_memory("huge", {1: 100 * GIB})  # over-commit: capped like a real GPU
    _, b = await src.sample()
    assert (b.memory_used_bytes, b.memory_free_bytes) == (24 * GIB, 0)
    src.clear_process_memory("huge")
    src.clear_process_memory("qwen")
    src.clear_process_memory("never-registered")
    a, b = await src.sample()
    assert a.memory_used_bytes == 6 * GIB and b.memory_used_bytes == 0
    with pytest.raises(IndexError):
        src.set_process_memory("x", {5: 1})


async def test_simulated_lost_gpu() -> None:
    src = open_gpu_source(sim_cfg(SimulatedGpu(), SimulatedGpu(name="NVIDIA L40S")), clock=FakeClock())
    assert isinstance(src, SimulatedSource)
    src.set_state(1, lost=True)
    a, b = await src.sample()
    assert a.lost is False and a.temperature_celsius == 40.0
    assert b.lost is True and b.errors == {"device": "GPU is lost"}
    assert b.gpu_class == "L40S" and b.uuid.endswith("-1")
    assert b.memory_used_bytes is None and b.temperature_celsius is None and b.power_watts is None
    src.set_state(1, lost=False)
    assert (await src.sample())[1].lost is False


async def test_nvml_process_memory_calls_are_noops(fake: FakeNvml) -> None:
    src = nvml_source()
    src.set_process_memory("llama", {0: GIB})
    src.clear_process_memory("llama")
    (a, _) = await src.sample()
    assert a.memory_used_bytes == 10 * GIB


async def test_nvml_count_failure_after_open_is_reported_per_known_gpu(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = nvml_source()
    await src.sample()

    def broken_count() -> int:
        raise nvml_error(pynvml.NVML_ERROR_UNKNOWN)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", broken_count)
    recs = await src.sample()
    assert [r.index for r in recs] == [0, 1]
    assert recs[1].uuid.startswith("GPU-00000001") and recs[1].errors == {"probe": "Unknown Error"}


# --- interconnect (agent/gpu/topology.py) --------------------------------------------------------

NV, SW, SWS, HB, NUMA, SYS, UNK = (
    LINK_NVLINK,
    LINK_PCIE_SWITCH,
    LINK_PCIE_SWITCHES,
    LINK_HOST_BRIDGE,
    LINK_NUMA_NODE,
    LINK_SYSTEM,
    LINK_UNKNOWN,
)


def four_gpus(fake: FakeNvml) -> None:
    """Two NVLink pairs (0-1, 2-3), one per CPU socket; 0 and 2 behind one PCIe switch anyway."""
    fake.gpus = [healthy_gpu(i) for i in range(4)]
    fake.nvlink = {(0, 1), (2, 3)}
    fake.ancestor = {(0, 1): pynvml.NVML_TOPOLOGY_HOSTBRIDGE, (2, 3): pynvml.NVML_TOPOLOGY_NODE}
    fake.ancestor[(0, 2)] = pynvml.NVML_TOPOLOGY_SINGLE  # more pairs: SYSTEM (the fake's default)
    fake.ancestor[(1, 3)] = pynvml.NVML_TOPOLOGY_MULTIPLE


FOUR_GPU_LINKS = [
    [0, NV, SW, SYS],
    [NV, 0, SYS, SWS],
    [SW, SYS, 0, NV],
    [SYS, SWS, NV, 0],
]


async def test_nvml_topology_nvlink_first_then_the_pcie_level(fake: FakeNvml) -> None:
    four_gpus(fake)
    recs = await nvml_source().sample()
    assert [r.links for r in recs] == FOUR_GPU_LINKS


async def test_nvml_topology_is_probed_once_per_gpu_set(fake: FakeNvml) -> None:
    four_gpus(fake)
    src = nvml_source()
    await src.sample()
    calls = fake.topology_calls
    assert calls > 0
    await src.sample()
    assert fake.topology_calls == calls  # static: not read again
    fake.gpus.append(healthy_gpu(4))  # a GPU appeared: the set changed
    recs = await src.sample()
    assert fake.topology_calls > calls
    assert recs[4].links == [SYS, SYS, SYS, SYS, 0] and recs[0].links == [*FOUR_GPU_LINKS[0], SYS]


async def test_nvml_topology_without_p2p_status_reads_each_nvlink_peer(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    four_gpus(fake)
    monkeypatch.delattr(pynvml, "nvmlDeviceGetP2PStatus")  # an old pynvml
    with capture_logs() as logs:
        recs = await nvml_source().sample()
    assert [r.links for r in recs] == FOUR_GPU_LINKS
    assert [e["problems"] for e in logs] == [["nvmlDeviceGetP2PStatus: not in this pynvml"]]


async def test_nvml_topology_not_supported_is_unknown_and_logged_once(fake: FakeNvml) -> None:
    fake.p2p_error = nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)  # and no NVLink on these GPUs
    fake.ancestor_error = nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
    src = nvml_source()
    with capture_logs() as logs:
        for _ in range(3):
            a, b = await src.sample()
            assert a.links == [] and b.links == []  # nothing known: no preference
            assert a.errors == {} and a.memory_used_bytes == 10 * GIB  # the sample is unharmed
    assert len(logs) == 1 and logs[0]["log_level"] == "warning"
    assert logs[0]["problems"] == [
        "nvmlDeviceGetP2PStatus: Not Supported",
        "nvmlDeviceGetTopologyCommonAncestor: Not Supported",
    ]


async def test_nvml_topology_nvlink_known_pcie_level_not(fake: FakeNvml) -> None:
    four_gpus(fake)
    fake.ancestor_error = nvml_error(pynvml.NVML_ERROR_UNKNOWN)
    recs = await nvml_source().sample()
    assert recs[0].links == [0, NV, UNK, UNK] and recs[3].links == [UNK, UNK, NV, 0]


async def test_nvml_topology_unknown_when_nvlink_cannot_be_told(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not knowing the NVLink pairs, a PCIe level could rank an NVLink pair last: report nothing.
    four_gpus(fake)
    fake.p2p_error = nvml_error(pynvml.NVML_ERROR_UNKNOWN)

    def broken_state(h: int, link: int) -> int:
        raise nvml_error(pynvml.NVML_ERROR_UNKNOWN)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetNvLinkState", broken_state)
    recs = await nvml_source().sample()
    assert [r.links for r in recs] == [[], [], [], []]


async def test_nvml_topology_functions_missing_or_broken_never_break_the_sample(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    for fn in ["nvmlDeviceGetP2PStatus", "nvmlDeviceGetTopologyCommonAncestor", "nvmlDeviceGetNvLinkState"]:
        monkeypatch.delattr(pynvml, fn)
    a, b = await nvml_source().sample()
    assert (a.links, b.links) == ([], []) and a.temperature_celsius == 55.0

    def bug(*args: object) -> int:
        raise RuntimeError("a bug in the topology code")

    monkeypatch.setattr(pynvml, "nvmlDeviceGetP2PStatus", bug, raising=False)
    with capture_logs() as logs:
        a, b = await nvml_source().sample()
    assert (a.links, b.links) == ([], []) and a.errors == {}
    assert "a bug in the topology code" in logs[0]["problems"][0]


async def test_nvml_topology_of_a_gpu_lost_at_start_is_unknown_and_the_others_known(fake: FakeNvml) -> None:
    four_gpus(fake)
    fake.gpus[1]["handle"] = nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
    recs = await nvml_source().sample()
    assert recs[1].lost is True and recs[1].errors == {"device": "GPU is lost"}
    assert recs[1].links == [UNK, 0, UNK, UNK]
    assert recs[0].links == [0, UNK, SW, SYS] and recs[2].links == [SW, UNK, 0, NV]


async def test_simulated_topology_two_nvlink_islands_on_two_sockets() -> None:
    gpus = [SimulatedGpu(nvlink_island=i // 4, numa_node=i // 4, pcie_switch=i // 2) for i in range(8)]
    src = open_gpu_source(sim_cfg(*gpus), clock=FakeClock())
    assert isinstance(src, SimulatedSource)
    recs = await src.sample()
    assert recs[0].links == [0, NV, NV, NV, SYS, SYS, SYS, SYS]
    assert recs[5].links == [SYS, SYS, SYS, SYS, NV, 0, NV, NV]
    src.set_state(5, lost=True)
    assert (await src.sample())[5].links == recs[5].links  # a lost GPU is still where it was

    # PCIe switches and sockets without NVLink; a GPU that declares nothing is unknown.
    gpus = [SimulatedGpu(pcie_switch=0, numa_node=0), SimulatedGpu(pcie_switch=0, numa_node=0),
            SimulatedGpu(pcie_switch=1, numa_node=0), SimulatedGpu()]  # fmt: skip
    recs = await open_gpu_source(sim_cfg(*gpus), clock=FakeClock()).sample()
    assert [r.links for r in recs] == [
        [0, SW, NUMA, UNK],
        [SW, 0, NUMA, UNK],
        [NUMA, NUMA, 0, UNK],
        [UNK, UNK, UNK, 0],
    ]
    # Nothing declared: no topology at all.
    recs = await open_gpu_source(sim_cfg(SimulatedGpu(), SimulatedGpu()), clock=FakeClock()).sample()
    assert [r.links for r in recs] == [[], []]
