"""What every backend shares: the launch spec, probe results, HTTP helpers and the warm-up.

A backend is policy about one kind of model server: how to start it (argv/env), how to tell
"loading" from "ready", and where its load numbers live. It owns no process and no state; the
supervisor drives it. All OpenAI-compatible servers take the same warm-up request.
"""

from __future__ import annotations

import asyncio
import enum
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import msgspec

from agent import serverflags
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
    # The server answered, with something that will not change by waiting (a health path it
    # does not have): worth showing as the instance's error while it is still STARTING.
    misconfigured: bool = False


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    body: bytes


class Verdict(enum.Enum):
    """What an upstream's HTTP status says, for the proxy's retry and error accounting."""

    ANSWER = "answer"  # the client's answer, good or bad (its own mistake): pass on, count nothing
    BUSY = "busy"  # the instance is full right now: try another, count it, do not probe
    FAILING = "failing"  # the instance is failing: try another, count it, probe it now


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    # Replaces the upstream's status and body when passed to the client (a server that says
    # 500 for a request that is too big: clients, the OpenAI SDK first, retry 5xx by themselves).
    rewrite: tuple[int, bytes] | None = None
    # Counts toward the cluster's error rate (degradation) and the instance's error counter.
    counted: bool = True


# RFC 9110: 501 = the server does not support what was asked (llama-server answers it for
# embeddings on an instance started without --embeddings), 505 = the HTTP version. Both are the
# request's problem; another instance of the same configuration answers the same.
CLIENT_5XX = frozenset({501, 505})


def judge_status(status: int) -> Verdict:
    """The rules every server shares; backends add what their own error bodies say."""
    if status == 429:
        return Verdict.BUSY
    if status < 500 or status in CLIENT_5XX:
        return Verdict.ANSWER
    return Verdict.FAILING


class ProbeError(Exception):
    """The server did not answer usefully (refused, reset, timed out)."""


NO_HEADERS: Mapping[str, str] = {}


async def http_get(
    http: aiohttp.ClientSession, url: str, timeout: float, headers: Mapping[str, str] = NO_HEADERS
) -> HttpAnswer:
    try:
        async with asyncio.timeout(timeout):
            async with http.get(url, allow_redirects=False, headers=headers) as resp:
                return HttpAnswer(resp.status, await resp.read())
    except TimeoutError:
        raise ProbeError(f"GET {url}: no answer within {timeout:g}s") from None
    except aiohttp.ClientConnectorError as e:
        err = e.os_error
        raise ProbeError(f"GET {url}: {os.strerror(err.errno) if err and err.errno else e}") from None
    except (aiohttp.ClientError, OSError) as e:
        raise ProbeError(f"GET {url}: {type(e).__name__}: {e}") from None


async def http_post_json(
    http: aiohttp.ClientSession, url: str, body: dict, timeout: float, headers: Mapping[str, str] = NO_HEADERS
) -> HttpAnswer:
    try:
        async with asyncio.timeout(timeout):
            async with http.post(
                url, data=msgspec.json.encode(body), headers={"Content-Type": "application/json", **headers}
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


class Upstream(msgspec.Struct, frozen=True):
    """Where one running instance answers, and the headers every request to it carries (its
    API key): what the supervisor's probes and the proxy's attempts both need."""

    base_url: str
    headers: Mapping[str, str] = NO_HEADERS


def read_key_file(path: str) -> str:
    """The first key in a key file (llama-server's --api-key-file format: one key a line,
    ``#`` starts a comment line)."""
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    raise ValueError(f"{path} holds no key")


class Backend:
    name: str = ""
    executable: tuple[str, ...] = ()

    def flags(self, setting: serverflags.Setting) -> tuple[str, ...]:
        return serverflags.FLAGS[self.name].get(setting, ())

    def given(self, inst: InstanceConfig, setting: serverflags.Setting) -> bool:
        """Does the instance's ``args`` set this itself?"""
        return serverflags.given(inst.args, self.flags(setting))

    def api_key(self, inst: InstanceConfig) -> str | None:
        """The key the server will require, from ``api_key_file`` or from the server's own flag
        or environment variable in the instance's config. Raises OSError/ValueError if the file
        cannot be read: an instance whose key is unknown would fail every probe."""
        if inst.api_key_file:
            return read_key_file(inst.api_key_file)
        names = self.flags("api_key")
        key = serverflags.value_of(inst.args, tuple(n for n in names if not n.endswith("-file")))
        if key:
            return key.split(",")[0]  # llama-server takes a comma-separated list
        key_file = serverflags.value_of(inst.args, tuple(n for n in names if n.endswith("-file")))
        if key_file:
            return read_key_file(key_file)
        env_name = serverflags.API_KEY_ENV.get(self.name)
        return inst.env.get(env_name) if env_name else None

    def key_env(self, inst: InstanceConfig, key: str | None) -> dict[str, str]:
        """Environment that hands ``api_key_file``'s key to the server."""
        env_name = serverflags.API_KEY_ENV.get(self.name)
        return {env_name: key} if inst.api_key_file and key and env_name else {}

    def judge(self, status: int, body: bytes) -> Judgement:
        """Is an error answer the instance's fault or the request's? See :class:`Verdict`."""
        return Judgement(judge_status(status))

    def threads_for(self, inst: InstanceConfig) -> int | None:
        """Worker threads for a CPU-quota'd instance: one per core of its quota. A server that
        spins as many threads as the host has cores on a 2-core quota is throttled mid-spin and
        runs ~10x slower (llama.cpp busy-waits between graph nodes)."""
        if inst.cpu_quota is None or not self.flags("threads") or self.given(inst, "threads"):
            return None
        return max(1, int(inst.cpu_quota))

    def launch(self, inst: InstanceConfig, port: int) -> LaunchSpec:
        raise NotImplementedError

    async def probe(
        self, http: aiohttp.ClientSession, up: Upstream, inst: InstanceConfig, timeout: float
    ) -> ProbeResult:
        raise NotImplementedError

    async def read_load(
        self, http: aiohttp.ClientSession, up: Upstream, inst: InstanceConfig, timeout: float
    ) -> InstanceLoad | None:
        return None

    def base_argv(self, inst: InstanceConfig) -> list[str]:
        if not inst.launcher:
            return list(self.executable)
        return [fill_placeholders(a, {"python": sys.executable}) for a in inst.launcher]

    async def warm_up(self, http: aiohttp.ClientSession, up: Upstream, inst: InstanceConfig) -> ProbeResult:
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
            ans = await http_post_json(http, up.base_url + path, body, w.timeout_s, up.headers)
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
    http: aiohttp.ClientSession, up: Upstream, path: str, timeout: float, names: dict[str, str]
) -> InstanceLoad | None:
    """Read a Prometheus endpoint; ``names`` maps InstanceLoad fields to metric names."""
    try:
        ans = await http_get(http, up.base_url + path, timeout, up.headers)
    except ProbeError:
        return None
    if ans.status != 200:
        return None
    samples = parse_samples(ans.body.decode("utf-8", "replace"), set(names.values()))
    values = {fld: samples.get(metric) for fld, metric in names.items()}
    if all(v is None for v in values.values()):
        return None
    return InstanceLoad(**values)
