"""Real GPUs through NVML (the ``pynvml`` module of the nvidia-ml-py package).

NVML calls block, and a wedged driver can block them for good. Reads therefore run in a worker
thread under a timeout. The thread is a daemon thread (agent/threads.py) rather than
``asyncio.to_thread``: the default executor is joined when the event loop shuts down (and its
threads at interpreter exit), so one hung NVML call would otherwise hang the agent's shutdown. While a read is
still hung, no second one is started; callers get the last known identities with an error.

The GPUs' interconnect (agent/gpu/topology.py) is static: it is read in the same worker thread,
under the same timeout, on the first read and again only when the number of GPUs changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog

from agent.gpu.topology import nvml_links, published
from agent.threads import in_daemon_thread
from gpufleet.gpuclasses import classify_gpu
from gpufleet.keyspace.records import GpuRecord
from gpufleet.tasks import wait_shielded

log = structlog.get_logger("agent.gpu")


class GpuSourceUnavailable(RuntimeError):
    """The configured GPU source cannot be used on this host; the message says what to do."""


_SIMULATED_HINT = 'or set [gpu] source = "simulated" to run with declared simulated GPUs.'


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases return bytes for names and UUIDs.
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class NvmlSource:
    kind = "nvml"

    def __init__(self, *, nvml_timeout_s: float = 5.0, overrides: dict[str, str] | None = None):
        self.nvml_timeout_s = nvml_timeout_s
        self._overrides = dict(overrides or {})
        self._nv: Any = None  # the pynvml module once open() succeeded
        self._count = 0
        # index -> (uuid, name, class): static, so read once; also names a device after it is lost.
        self._static: dict[int, tuple[str, str, str]] = {}
        self._inflight: asyncio.Future[list[GpuRecord]] | None = None
        self._links: list[list[int]] = []  # by GPU index: GpuRecord.links
        self._links_for: int | None = None  # the GPU count they were probed for

    def open(self) -> None:
        try:
            import pynvml
        except ImportError as err:
            raise GpuSourceUnavailable(
                f"NVML is not available (cannot import pynvml: {err}): install the nvidia-ml-py "
                f"package, {_SIMULATED_HINT}"
            ) from err
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            if isinstance(err, pynvml.NVMLError_LibraryNotFound | pynvml.NVMLError_DriverNotLoaded):
                cause = "this host has no NVIDIA driver, or it is not loaded. Install the driver,"
            else:
                cause = "check the NVIDIA driver (does nvidia-smi work?),"
            raise GpuSourceUnavailable(f"NVML is not available ({err}): {cause} {_SIMULATED_HINT}") from err
        self._nv = pynvml
        try:
            self._count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as err:
            self.close()
            raise GpuSourceUnavailable(f"NVML cannot count GPUs ({err}): check the NVIDIA driver.") from err

    def close(self) -> None:
        nv, self._nv = self._nv, None
        if nv is not None:
            try:
                nv.nvmlShutdown()
            except Exception:
                pass  # shutting down anyway; nothing useful to do with the error

    # Real NVML measures what instances use; these exist so callers need not check the source kind.
    def set_process_memory(self, owner: str, per_gpu_bytes: dict[int, int]) -> None:
        pass

    def clear_process_memory(self, owner: str) -> None:
        pass

    async def sample(self) -> list[GpuRecord]:
        nv = self._nv
        if nv is None:
            raise RuntimeError("NvmlSource.sample() before open()")
        if self._inflight is None or self._inflight.done():
            self._inflight = in_daemon_thread(self._read_all, "nvml-probe")
        try:
            # shield: a timeout abandons the wait, not the read; the thread cannot be interrupted.
            return await wait_shielded(self._inflight, self.nvml_timeout_s)
        except TimeoutError:
            return self._without_data("probe", f"timeout after {self.nvml_timeout_s:g}s (NVML call hung)")
        except nv.NVMLError as err:
            return self._without_data("probe", str(err))

    # --- worker thread --------------------------------------------------------------------------

    def _read_all(self) -> list[GpuRecord]:
        self._count = self._nv.nvmlDeviceGetCount()
        if self._links_for != self._count:
            self._links = self._probe_links(self._count)
            self._links_for = self._count
        return [self._read_device(i) for i in range(self._count)]

    def _probe_links(self, count: int) -> list[list[int]]:
        nv = self._nv
        handles = []
        for i in range(count):
            try:
                handles.append(nv.nvmlDeviceGetHandleByIndex(i))
            except nv.NVMLError:
                handles.append(None)  # the device read reports it; its pairs stay unknown
        try:
            rows, problems = nvml_links(nv, handles)
        except Exception as err:  # the interconnect is a preference: never worth the GPU sample
            rows, problems = [[] for _ in range(count)], [f"topology probe failed: {err!r}"]
        if problems:
            # Once per GPU set (the probe is not repeated), so this cannot flood the log.
            log.warning(
                "GPU interconnect partly unknown; placement prefers no GPUs over others where it is",
                problems=problems,
            )
        return published(rows)

    def _read_device(self, index: int) -> GpuRecord:
        nv = self._nv
        errors: dict[str, str] = {}

        def read(field: str, fn: Callable[[], Any]) -> Any:
            # One field at a time: an unsupported sensor must not hide the others. A lost GPU
            # (or a missing handle) is about the whole device, so that propagates.
            try:
                return fn()
            except nv.NVMLError_GpuIsLost:
                raise
            except nv.NVMLError as err:
                errors[field] = str(err)
                return None

        try:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            static = self._static.get(index)
            if static is None:
                uuid = read("uuid", lambda: _text(nv.nvmlDeviceGetUUID(handle)))
                name = read("name", lambda: _text(nv.nvmlDeviceGetName(handle)))
                static = (uuid or "unknown", name or "unknown", classify_gpu(name or "", self._overrides))
                if uuid is not None and name is not None:
                    self._static[index] = static
            mem = read("memory", lambda: nv.nvmlDeviceGetMemoryInfo(handle))
            util = read("utilization", lambda: nv.nvmlDeviceGetUtilizationRates(handle).gpu)
            temp = read("temperature", lambda: nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))
            power_mw = read("power", lambda: nv.nvmlDeviceGetPowerUsage(handle))
        except nv.NVMLError as err:
            # GPU lost (or no handle at all): report the device, with no live values, and go on.
            lost = isinstance(err, nv.NVMLError_GpuIsLost)
            return self._record_without_data(index, {"device": str(err)}, lost=lost)
        uuid, name, gpu_class = static
        return GpuRecord(
            index=index,
            uuid=uuid,
            name=name,
            gpu_class=gpu_class,
            memory_total_bytes=mem.total if mem is not None else None,
            memory_used_bytes=mem.used if mem is not None else None,
            memory_free_bytes=mem.free if mem is not None else None,
            utilization_percent=float(util) if util is not None else None,
            temperature_celsius=float(temp) if temp is not None else None,
            power_watts=power_mw / 1000.0 if power_mw is not None else None,  # NVML reports milliwatts
            errors=errors,
            links=self._links_of(index),
        )

    # --- helpers --------------------------------------------------------------------------------

    def _record_without_data(self, index: int, errors: dict[str, str], *, lost: bool = False) -> GpuRecord:
        unknown = ("unknown", "unknown", classify_gpu("", self._overrides))
        uuid, name, gpu_class = self._static.get(index, unknown)
        links = self._links_of(index)
        return GpuRecord(index=index, uuid=uuid, name=name, gpu_class=gpu_class, lost=lost, errors=errors, links=links)

    def _links_of(self, index: int) -> list[int]:
        return list(self._links[index]) if index < len(self._links) else []

    def _without_data(self, field: str, message: str) -> list[GpuRecord]:
        # Stale numbers would mislead placement, so the live fields are None rather than last values.
        return [self._record_without_data(i, {field: message}) for i in range(self._count)]
