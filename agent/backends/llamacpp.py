"""llama.cpp's `llama-server`: /health is 503 while the model loads and 200 once it can serve.

Checked against a real llama-server (built by scripts/build-llama-server, tests/realbackend/):

- Sizing. Without ``-c`` llama-server sizes its KV cache for the model's whole training context
  (a model declaring 1M tokens took 595 MB and seconds to start instead of 20 MB), so the
  agent always passes one: ``context_size``, or :data:`DEFAULT_CONTEXT`. With ``-np`` unset,
  llama-server picks 4 slots sharing one unified KV cache; ``parallel`` sets the count and
  keeps the cache unified.
- Threads. llama.cpp busy-waits between graph nodes with one thread per core of the host; on a
  CPU quota of 2 cores that is throttled mid-spin and ~10x slower, so ``cpu_quota`` sets ``-t``.
- Load. Current llama-server exports ``requests_processing`` and ``requests_deferred`` but no
  KV-cache usage any more (``kv_cache_usage_ratio`` was removed upstream), so that stays null.
- Errors. A prompt longer than a slot's context is a 400 (``exceed_context_size_error``) and
  passes through. Concurrent long generations that fill the *shared* KV cache get
  ``500 "Context size has been exceeded."``: the instance is healthy and full, so the request
  may try another instance, the instance is not probed, nothing counts toward the cluster's
  error rate, and if no instance has room the client gets 429 (OpenAI SDKs back off and retry
  that, while a 500 reads as a server fault).
- Keys. With ``--api-key``/``LLAMA_API_KEY`` every path but /health needs the key, /metrics
  included: the agent sends it (backends/base.py ``Backend.api_key``).
"""

from __future__ import annotations

import aiohttp
import msgspec

from agent import serverflags
from agent.config import InstanceConfig
from gpufleet.keyspace.records import InstanceLoad

from .base import (
    Backend,
    Judgement,
    LaunchSpec,
    ProbeError,
    ProbeResult,
    Upstream,
    Verdict,
    http_get,
    judge_status,
    load_from_metrics,
    short,
)

LOAD_METRICS = {
    "requests_running": "llamacpp:requests_processing",
    "requests_waiting": "llamacpp:requests_deferred",
}
ALL_LAYERS = 999  # llama.cpp clamps -ngl to the model's layer count
DEFAULT_CONTEXT = 8192  # tokens, shared by the slots (llama-server's unified KV cache)
KV_FULL = b"Context size has been exceeded"
KV_UNIFIED_FLAGS = ("-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified")


def capacity_error(message: str) -> bytes:
    err = {"message": message, "type": "rate_limit_error", "code": "context_capacity_exceeded"}
    return msgspec.json.encode({"error": err})


class LlamaCppBackend(Backend):
    name = "llamacpp"
    executable = ("llama-server",)

    def launch(self, inst: InstanceConfig, port: int) -> LaunchSpec:
        layers = inst.gpu_layers if inst.gpu_layers is not None else (ALL_LAYERS if inst.gpus else 0)
        argv = [*self.base_argv(inst), "-m", inst.model, "--host", inst.host, "--port", str(port)]
        # --metrics enables /metrics, which is where we read the load from.
        argv += ["-ngl", str(layers), "--alias", inst.client_model, "--metrics"]
        if not self.given(inst, "context_size"):
            argv += ["-c", str(inst.context_size or DEFAULT_CONTEXT)]
        if inst.parallel is not None:
            argv += ["-np", str(inst.parallel)]
            # llama-server splits the context between explicitly counted slots; unified, every
            # slot may take a whole context_size-token request from the shared pool, which is
            # what context_size means for the other backends (vLLM --max-model-len).
            if not serverflags.given(inst.args, KV_UNIFIED_FLAGS):
                argv += ["--kv-unified"]
        if (threads := self.threads_for(inst)) is not None:
            argv += ["-t", str(threads), "-tb", str(threads)]
        return LaunchSpec(argv + list(inst.args))

    def judge(self, status: int, body: bytes) -> Judgement:
        if status == 500 and KV_FULL in body:
            message = "the instance's KV cache is full with other requests; retry later"
            return Judgement(Verdict.BUSY, rewrite=(429, capacity_error(message)), counted=False)
        return Judgement(judge_status(status))

    async def probe(
        self, http: aiohttp.ClientSession, up: Upstream, inst: InstanceConfig, timeout: float
    ) -> ProbeResult:
        try:
            health = await http_get(http, up.base_url + "/health", timeout, up.headers)
        except ProbeError as e:
            return ProbeResult(False, str(e))
        if health.status == 503:
            return ProbeResult(False, "loading model", loading=True)
        if health.status != 200:
            return ProbeResult(False, f"/health: HTTP {health.status} {short(health.body)}")
        return ProbeResult(True)

    async def read_load(
        self, http: aiohttp.ClientSession, up: Upstream, inst: InstanceConfig, timeout: float
    ) -> InstanceLoad | None:
        return await load_from_metrics(http, up, "/metrics", timeout, LOAD_METRICS)
