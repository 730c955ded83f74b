"""vLLM (`vllm serve`): ready when /health answers 200 *and* the model is listed in /v1/models.

vLLM keeps its port closed while it loads weights, so "connection refused" during start-up is
normal; /health can turn 200 a moment before the OpenAI router lists the served name.
"""

from __future__ import annotations

import aiohttp
import msgspec

from agent.config import InstanceConfig
from gpufleet.keyspace.records import InstanceLoad

from .base import Backend, LaunchSpec, ProbeError, ProbeResult, Upstream, http_get, load_from_metrics, short

LOAD_METRICS = {
    "requests_running": "vllm:num_requests_running",
    "requests_waiting": "vllm:num_requests_waiting",
    "kv_cache_usage_ratio": "vllm:kv_cache_usage_perc",
}


class VllmBackend(Backend):
    name = "vllm"
    executable = ("vllm", "serve")

    def launch(self, inst: InstanceConfig, port: int) -> LaunchSpec:
        argv = [*self.base_argv(inst), inst.model, "--host", inst.host, "--port", str(port)]
        argv += ["--served-model-name", inst.client_model]
        if inst.gpus:
            argv += ["--gpu-memory-utilization", f"{inst.gpu_memory_fraction:g}"]
            if len(inst.gpus) > 1 and "--tensor-parallel-size" not in inst.args:
                argv += ["--tensor-parallel-size", str(len(inst.gpus))]
        if inst.context_size is not None:
            argv += ["--max-model-len", str(inst.context_size)]
        if inst.parallel is not None:
            argv += ["--max-num-seqs", str(inst.parallel)]
        return LaunchSpec(argv + list(inst.args))

    async def probe(
        self, http: aiohttp.ClientSession, up: Upstream, inst: InstanceConfig, timeout: float
    ) -> ProbeResult:
        try:
            health = await http_get(http, up.base_url + "/health", timeout, up.headers)
            if health.status != 200:
                return ProbeResult(False, f"/health: HTTP {health.status} {short(health.body)}")
            models = await http_get(http, up.base_url + "/v1/models", timeout, up.headers)
        except ProbeError as e:
            return ProbeResult(False, str(e))
        if models.status != 200:
            return ProbeResult(False, f"/v1/models: HTTP {models.status}")
        try:
            ids = {m.get("id") for m in msgspec.json.decode(models.body).get("data", [])}
        except (msgspec.DecodeError, AttributeError):
            return ProbeResult(False, "/v1/models: not the OpenAI list shape")
        if inst.client_model not in ids:
            return ProbeResult(False, f"/v1/models does not list {inst.client_model!r}", loading=True)
        return ProbeResult(True)

    async def read_load(
        self, http: aiohttp.ClientSession, up: Upstream, inst: InstanceConfig, timeout: float
    ) -> InstanceLoad | None:
        return await load_from_metrics(http, up, "/metrics", timeout, LOAD_METRICS)
