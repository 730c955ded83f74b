"""Any server: the operator gives the argv (with placeholders) and the health path.

Ready means ``health_path`` answers 2xx; unset, ``/health``, or ``/v1/models`` where the server
has no ``/health`` (404). A path that answers 404 is reported as such in the instance's error.
If ``metrics_path`` is set we look there for vLLM's or llama.cpp's load metric names, which
covers most OpenAI-compatible servers that export any.
"""

from __future__ import annotations

import sys

import aiohttp

from agent.config import InstanceConfig
from gpufleet.keyspace.records import InstanceLoad

from . import llamacpp, vllm
from .base import (
    Backend,
    LaunchSpec,
    ProbeError,
    ProbeResult,
    Upstream,
    fill_placeholders,
    http_get,
    load_from_metrics,
    short,
)

DEFAULT_HEALTH_PATH = "/health"
FALLBACK_HEALTH_PATH = "/v1/models"


class CommandBackend(Backend):
    name = "command"

    def launch(self, inst: InstanceConfig, port: int) -> LaunchSpec:
        values = {
            "python": sys.executable,
            "port": str(port),
            "host": inst.host,
            "model": inst.model,
            "served_model_name": inst.client_model,
            "gpu_memory_fraction": f"{inst.gpu_memory_fraction:g}" if inst.gpu_memory_fraction else "",
        }
        argv = [fill_placeholders(a, values) for a in (inst.command or [])]
        return LaunchSpec(argv + list(inst.args))

    async def probe(
        self, http: aiohttp.ClientSession, up: Upstream, inst: InstanceConfig, timeout: float
    ) -> ProbeResult:
        path = inst.health_path or DEFAULT_HEALTH_PATH
        try:
            ans = await http_get(http, up.base_url + path, timeout, up.headers)
            if ans.status == 404 and inst.health_path is None:
                # Not every OpenAI-compatible server has /health (llama-cpp-python's has not);
                # every one has /v1/models.
                path = FALLBACK_HEALTH_PATH
                ans = await http_get(http, up.base_url + path, timeout, up.headers)
        except ProbeError as e:
            return ProbeResult(False, str(e))
        if ans.status == 404:
            hint = "set health_path to a path the server answers 2xx on when ready"
            tried = f"{DEFAULT_HEALTH_PATH} and {FALLBACK_HEALTH_PATH}" if inst.health_path is None else path
            return ProbeResult(False, f"{tried}: HTTP 404: the server has no such path ({hint})", misconfigured=True)
        if not 200 <= ans.status < 300:
            return ProbeResult(False, f"{path}: HTTP {ans.status} {short(ans.body)}", loading=ans.status == 503)
        return ProbeResult(True)

    async def read_load(
        self, http: aiohttp.ClientSession, up: Upstream, inst: InstanceConfig, timeout: float
    ) -> InstanceLoad | None:
        if not inst.metrics_path:
            return None
        path = inst.metrics_path
        return await load_from_metrics(http, up, path, timeout, vllm.LOAD_METRICS) or await load_from_metrics(
            http, up, path, timeout, llamacpp.LOAD_METRICS
        )
