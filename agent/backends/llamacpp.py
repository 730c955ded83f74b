"""llama.cpp's `llama-server`: /health is 503 while the model loads and 200 once it can serve."""

from __future__ import annotations

import aiohttp

from agent.config import InstanceConfig
from gpufleet.keyspace.records import InstanceLoad

from .base import Backend, LaunchSpec, ProbeError, ProbeResult, http_get, load_from_metrics, short

LOAD_METRICS = {
    "requests_running": "llamacpp:requests_processing",
    "requests_waiting": "llamacpp:requests_deferred",
    "kv_cache_usage_ratio": "llamacpp:kv_cache_usage_ratio",
}
ALL_LAYERS = 999  # llama.cpp clamps -ngl to the model's layer count


class LlamaCppBackend(Backend):
    name = "llamacpp"
    executable = ("llama-server",)

    def launch(self, inst: InstanceConfig, port: int) -> LaunchSpec:
        layers = inst.gpu_layers if inst.gpu_layers is not None else (ALL_LAYERS if inst.gpus else 0)
        argv = [*self.base_argv(inst), "-m", inst.model, "--host", inst.host, "--port", str(port)]
        # --metrics enables /metrics, which is where we read the load from.
        argv += ["-ngl", str(layers), "--alias", inst.client_model, "--metrics"]
        return LaunchSpec(argv + list(inst.args))

    async def probe(
        self, http: aiohttp.ClientSession, base_url: str, inst: InstanceConfig, timeout: float
    ) -> ProbeResult:
        try:
            health = await http_get(http, base_url + "/health", timeout)
        except ProbeError as e:
            return ProbeResult(False, str(e))
        if health.status == 503:
            return ProbeResult(False, "loading model", loading=True)
        if health.status != 200:
            return ProbeResult(False, f"/health: HTTP {health.status} {short(health.body)}")
        return ProbeResult(True)

    async def read_load(
        self, http: aiohttp.ClientSession, base_url: str, inst: InstanceConfig, timeout: float
    ) -> InstanceLoad | None:
        return await load_from_metrics(http, base_url + "/metrics", timeout, LOAD_METRICS)
