"""What every backend shares: the launch spec, probe results, HTTP helpers and the warm-up.

A backend is policy about one kind of model server: how to start it (argv/env), how to tell
"loading" from "ready", and where its load numbers live. It owns no process and no state; the
supervisor drives it. All OpenAI-compatible servers take the same warm-up request.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass, field

import aiohttp
import msgspec

from agent.config import InstanceConfig
from gpufleet.keyspace.records import InstanceLoad

from .prometheus_text import parse_samples


@dataclass(frozen=True)
class LaunchSpec:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the agent's environment


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str = ""
    # The server answered and says it is still loading (llama.cpp's 503): not a failure yet.
    loading: bool = False


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    body: bytes


class ProbeError(Exception):
    """The server did not answer usefully (refused, reset, timed out)."""


async def http_get(http: aiohttp.ClientSession, url: str, timeout: float) -> HttpAnswer:
    try:
        async with asyncio.timeout(timeout):
            async with http.get(url, allow_redirects=False) as resp:
                return HttpAnswer(resp.status, await resp.read())
    except TimeoutError:
        raise ProbeError(f"GET {url}: no answer within {timeout:g}s") from None
    except aiohttp.ClientConnectorError as e:
        err = e.os_error
        raise ProbeError(f"GET {url}: {os.strerror(err.errno) if err and err.errno else e}") from None
    except (aiohttp.ClientError, OSError) as e:
        raise ProbeError(f"GET {url}: {type(e).__name__}: {e}") from None


async def http_post_json(http: aiohttp.ClientSession, url: str, body: dict, timeout: float) -> HttpAnswer:
    try:
        async with asyncio.timeout(timeout):
            async with http.post(
                url, data=msgspec.json.encode(body), headers={"Content-Type": "application/json"}
            ) as resp:
                return HttpAnswer(resp.status, await resp.read())
    except TimeoutError:
        raise ProbeError(f"POST {url}: no answer within {timeout:g}s") from None
    except (aiohttp.ClientError, OSError) as e:
        raise ProbeError(f"POST {url}: {type(e).__name__}: {e}") from None


def short(body: bytes, limit: int = 200) -> str:
    return body[:limit].decode("utf-8", "replace").strip()


def fill_placeholders(arg: str, values: dict[str, str]) -> str:
    # str.replace, not str.format: arguments may legitimately contain JSON braces.
    for key, val in values.items():
        arg = arg.replace("{" + key + "}", val)
    return arg


class Backend:
    name: str = ""
    executable: tuple[str, ...] = ()

    def launch(self, inst: InstanceConfig, port: int) -> LaunchSpec:
        raise NotImplementedError

    async def probe(
        self, http: aiohttp.ClientSession, base_url: str, inst: InstanceConfig, timeout: float
    ) -> ProbeResult:
        raise NotImplementedError

    async def read_load(
        self, http: aiohttp.ClientSession, base_url: str, inst: InstanceConfig, timeout: float
    ) -> InstanceLoad | None:
        return None

    def base_argv(self, inst: InstanceConfig) -> list[str]:
        if not inst.launcher:
            return list(self.executable)
        return [fill_placeholders(a, {"python": sys.executable}) for a in inst.launcher]

    async def warm_up(self, http: aiohttp.ClientSession, base_url: str, inst: InstanceConfig) -> ProbeResult:
        """One real inference request: the first one pays for CUDA graphs, caches and lazy loads."""
        w = inst.warmup
        model = inst.client_model
        if w.kind == "chat":
            path = "/v1/chat/completions"
            body: dict = {
                "model": model,
                "messages": [{"role": "user", "content": w.prompt}],
                "max_tokens": w.max_tokens,
            }
        elif w.kind == "completion":
            path, body = "/v1/completions", {"model": model, "prompt": w.prompt, "max_tokens": w.max_tokens}
        else:
            path, body = "/v1/embeddings", {"model": model, "input": w.prompt}
        try:
            ans = await http_post_json(http, base_url + path, body, w.timeout_s)
        except ProbeError as e:
            return ProbeResult(False, f"warm-up: {e}")
        if ans.status != 200:
            return ProbeResult(False, f"warm-up: HTTP {ans.status}: {short(ans.body)}")
        try:
            doc = msgspec.json.decode(ans.body)
        except msgspec.DecodeError:
            return ProbeResult(False, "warm-up: answer is not JSON")
        key = "data" if w.kind == "embedding" else "choices"
        if not isinstance(doc, dict) or not doc.get(key):
            return ProbeResult(False, f"warm-up: answer has no {key!r}")
        return ProbeResult(True, "warm-up ok")


async def load_from_metrics(
    http: aiohttp.ClientSession, url: str, timeout: float, names: dict[str, str]
) -> InstanceLoad | None:
    """Read a Prometheus endpoint; ``names`` maps InstanceLoad fields to metric names."""
    try:
        ans = await http_get(http, url, timeout)
    except ProbeError:
        return None
    if ans.status != 200:
        return None
    samples = parse_samples(ans.body.decode("utf-8", "replace"), set(names.values()))
    values = {fld: samples.get(metric) for fld, metric in names.items()}
    if all(v is None for v in values.values()):
        return None
    return InstanceLoad(**values)
