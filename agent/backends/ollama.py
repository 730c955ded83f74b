"""Ollama (`ollama serve`): one server per port, bound through OLLAMA_HOST.

Ollama has no memory-fraction flag, so ``gpu_memory_fraction`` only reserves room in our
admission plan. Ready means the server answers /api/tags and the model is pulled; the warm-up
then loads it into GPU memory, and OLLAMA_KEEP_ALIVE=-1 keeps it there instead of unloading
after five idle minutes (which would make the next user pay the load time).
"""

from __future__ import annotations

import aiohttp
import msgspec

from agent.config import InstanceConfig

from .base import Backend, LaunchSpec, ProbeError, ProbeResult, Upstream, http_get


def _tag(name: str) -> str:
    return name if ":" in name else name + ":latest"


class OllamaBackend(Backend):
    name = "ollama"
    executable = ("ollama", "serve")

    def launch(self, inst: InstanceConfig, port: int) -> LaunchSpec:
        env = {"OLLAMA_HOST": f"{inst.host}:{port}", "OLLAMA_KEEP_ALIVE": "-1"}
        if inst.context_size is not None:
            env["OLLAMA_CONTEXT_LENGTH"] = str(inst.context_size)
        if inst.parallel is not None:
            env["OLLAMA_NUM_PARALLEL"] = str(inst.parallel)
        return LaunchSpec([*self.base_argv(inst), *inst.args], env)

    async def probe(
        self, http: aiohttp.ClientSession, up: Upstream, inst: InstanceConfig, timeout: float
    ) -> ProbeResult:
        try:
            tags = await http_get(http, up.base_url + "/api/tags", timeout, up.headers)
        except ProbeError as e:
            return ProbeResult(False, str(e))
        if tags.status != 200:
            return ProbeResult(False, f"/api/tags: HTTP {tags.status}")
        try:
            names = {_tag(m.get("name", "")) for m in msgspec.json.decode(tags.body).get("models", [])}
        except (msgspec.DecodeError, AttributeError):
            return ProbeResult(False, "/api/tags: unexpected answer")
        if _tag(inst.model) not in names:
            return ProbeResult(False, f"model {inst.model!r} is not pulled on this host (ollama pull {inst.model})")
        return ProbeResult(True)
