"""Any server: the operator gives the argv (with placeholders) and the health path.

Ready means ``health_path`` answers 2xx. If ``metrics_path`` is set we look there for vLLM's or
llama.cpp's load metric names, which covers most OpenAI-compatible servers that export any.
"""

from __future__ import annotations

import sys

import aiohttp

from agent.config import InstanceConfig
from gpufleet.keyspace.records import InstanceLoad

from . import llamacpp, vllm
from .base import Backend, LaunchSpec, ProbeError, ProbeResult, fill_placeholders, http_get, load_from_metrics, short


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
        self, http: aiohttp.ClientSession, base_url: str, inst: InstanceConfig, timeout: float
    ) -> ProbeResult:
        try:
            ans = await http_get(http, base_url + inst.health_path, timeout)
        except ProbeError as e:
            return ProbeResult(False, str(e))
        if not 200 <= ans.status < 300:
            return ProbeResult(
                False, f"{inst.health_path}: HTTP {ans.status} {short(ans.body)}", loading=ans.status == 503
            )
        return ProbeResult(True)

    async def read_load(
        self, http: aiohttp.ClientSession, base_url: str, inst: InstanceConfig, timeout: float
    ) -> InstanceLoad | None:
        if not inst.metrics_path:
            return None
        url = base_url + inst.metrics_path
        return await load_from_metrics(http, url, timeout, vllm.LOAD_METRICS) or await load_from_metrics(
            http, url, timeout, llamacpp.LOAD_METRICS
        )
