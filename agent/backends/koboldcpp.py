"""KoboldCPP: GPU instances offload layers with --usecublas --gpulayers; CPU-only ones offload none.

KoboldCPP opens its port only once the model is loaded; /api/v1/model then names it. Its load
is in /api/extra/perf (``queue`` waiting, ``idle`` 0 while generating).
"""

from __future__ import annotations

import aiohttp
import msgspec

from agent.config import InstanceConfig
from gpufleet.keyspace.records import InstanceLoad

from .base import Backend, LaunchSpec, ProbeError, ProbeResult, Upstream, http_get

ALL_LAYERS = 999


class KoboldCppBackend(Backend):
    name = "koboldcpp"
    executable = ("koboldcpp",)

    def launch(self, inst: InstanceConfig, port: int) -> LaunchSpec:
        argv = [*self.base_argv(inst), "--model", inst.model, "--host", inst.host, "--port", str(port)]
        if inst.gpus:
            layers = inst.gpu_layers if inst.gpu_layers is not None else ALL_LAYERS
            argv += ["--usecublas", "--gpulayers", str(layers)]
        else:
            argv += ["--gpulayers", "0"]
        if inst.context_size is not None:
            argv += ["--contextsize", str(inst.context_size)]
        if inst.parallel is not None:
            argv += ["--multiuser", str(inst.parallel)]
        if (threads := self.threads_for(inst)) is not None:
            argv += ["--threads", str(threads), "--blasthreads", str(threads)]
        return LaunchSpec(argv + list(inst.args))

    async def probe(
        self, http: aiohttp.ClientSession, up: Upstream, inst: InstanceConfig, timeout: float
    ) -> ProbeResult:
        try:
            ans = await http_get(http, up.base_url + "/api/v1/model", timeout, up.headers)
        except ProbeError as e:
            return ProbeResult(False, str(e))
        if ans.status != 200:
            return ProbeResult(False, f"/api/v1/model: HTTP {ans.status}")
        return ProbeResult(True)

    async def read_load(
        self, http: aiohttp.ClientSession, up: Upstream, inst: InstanceConfig, timeout: float
    ) -> InstanceLoad | None:
        try:
            ans = await http_get(http, up.base_url + "/api/extra/perf", timeout, up.headers)
            perf = msgspec.json.decode(ans.body) if ans.status == 200 else None
        except (ProbeError, msgspec.DecodeError):
            return None
        if not isinstance(perf, dict):
            return None
        idle = perf.get("idle")
        queue = perf.get("queue")
        return InstanceLoad(
            requests_running=float(1 - idle) if isinstance(idle, int) else None,
            requests_waiting=float(queue) if isinstance(queue, int | float) else None,
        )
