"""The simulated vLLM server, as a real process over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gpufleet_dev.simulated_server import parse_args

MODEL = "sim-model"
pytestmark = pytest.mark.timeout(30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: asyncio.subprocess.Process
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_healthy(self, session: aiohttp.ClientSession, within_s: float = 10.0) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                async with session.get(self.url + "/health", timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientConnectionError, TimeoutError):
                pass
            await asyncio.sleep(0.02)
        pytest.fail(f"server not healthy within {within_s} s:\n{self.log()}")

    async def wait_exit(self, within_s: float = 5.0) -> int:
        return await asyncio.wait_for(self.proc.wait(), within_s)


Start = Callable[..., Awaitable[Server]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def start(tmp_path: Path, session: aiohttp.ClientSession) -> AsyncIterator[Start]:
    """Start a server (`start(*flags, env=..., wait=...)`); SIGTERM it at the end and expect exit 0."""
    servers: list[Server] = []

    async def _start(*flags: str, env: dict[str, str] | None = None, wait: bool = True) -> Server:
        port = free_port()
        log_path = tmp_path / f"server-{port}.log"
        clean_env = {k: v for k, v in os.environ.items() if not k.startswith("SIM_")}
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gpufleet_dev.simulated_server",
                "serve",
                MODEL,
                "--port",
                str(port),
                *flags,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**clean_env, **(env or {})},
            )
        server = Server(proc, port, log_path)
        servers.append(server)
        if wait:
            await server.wait_healthy(session)
        return server

    yield _start
    for server in servers:
        if server.proc.returncode is not None:
            continue  # the test ended it (crash tests) and checked how
        server.proc.send_signal(signal.SIGTERM)
        try:
            rc = await server.wait_exit(3.0)
        except TimeoutError:
            server.proc.kill()
            await server.proc.wait()
            pytest.fail(f"server ignored SIGTERM:\n{server.log()}")
        assert rc == 0, server.log()


async def post(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with session.post(url, json=body) as r:
        return r.status, await r.json(content_type=None)


async def sse_events(resp: aiohttp.ClientResponse) -> list[tuple[float, str]]:
    """(arrival time, payload) of each `data:` event, until the stream ends."""
    events = []
    async for line in resp.content:
        if line.startswith(b"data: "):
            events.append((time.monotonic(), line[6:].decode().strip()))
    return events


def sample(metrics_text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", metrics_text, re.MULTILINE)
    assert m, f"{name} not in metrics"
    return float(m.group(1))


def chat_body(text: Any = "Hello there world", max_tokens: int = 5, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": "You are terse"}, {"role": "user", "content": text}]
    return {"model": MODEL, "messages": messages, "max_tokens": max_tokens, **extra}


def test_command_line_accepts_vllm_syntax(monkeypatch: pytest.MonkeyPatch) -> None:
    args = parse_args(["serve", "--port", "9001", "org/model", "--block-size", "16", "--enforce-eager"])
    assert (args.model, args.port, args.enforce_eager) == ("org/model", 9001, True)
    assert args.served_model_name is None
    monkeypatch.setenv("SIM_LATENCY_MS", "250")
    args = parse_args(["m", "--served-model-name", "a", "b", "--tokens-per-second", "7"])
    assert (args.model, args.served_model_name) == ("m", ["a", "b"])
    assert (args.latency_ms, args.tokens_per_second) == (250, 7)
    assert parse_args(["m", "--latency-ms", "5"]).latency_ms == 5  # the flag beats the environment


async def test_models_version_health(start: Start, session: aiohttp.ClientSession) -> None:
    server = await start("--served-model-name", "a", "b", "--max-model-len", "2048", "--swap-space", "4")
    async with session.get(server.url + "/v1/models") as r:
        models = await r.json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["a", "b"]
    first = models["data"][0]
    assert first["object"] == "model" and first["owned_by"] == "vllm" and first["root"] == MODEL
    assert first["parent"] is None and first["max_model_len"] == 2048 and first["permission"] == []
    assert isinstance(first["created"], int)
    async with session.get(server.url + "/health") as r:
        assert r.status == 200 and await r.read() == b""
    async with session.get(server.url + "/version") as r:
        assert await r.json() == {"version": "0.0.0-sim"}
    async with session.get(server.url + "/no/such/route") as r:
        assert r.status == 404 and await r.json() == {"detail": "Not Found"}
    assert "--swap-space 4" in server.log() and "Application startup complete." in server.log()


async def test_chat_completion(start: Start, session: aiohttp.ClientSession) -> None:
    server = await start("--tokens-per-second", "0")
    url = server.url + "/v1/chat/completions"
    status, out = await post(session, url, chat_body())
    assert status == 200
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion" and out["model"] == MODEL
    assert isinstance(out["created"], int) and out["prompt_logprobs"] is None
    [choice] = out["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] == "length" and choice["stop_reason"] is None
    message = choice["message"]
    assert message["role"] == "assistant" and message["tool_calls"] == []
    assert len(message["content"].split()) == 5 and message["content"].endswith(" ")
    assert out["usage"] == {"prompt_tokens": 6, "total_tokens": 11, "completion_tokens": 5}

    # Deterministic from the last user message; a list of content parts counts its text parts.
    parts = [{"type": "text", "text": "Hello there world"}, {"type": "image_url", "image_url": {"url": "x"}}]
    _, same = await post(session, url, chat_body(parts))
    assert same["choices"][0]["message"]["content"] == message["content"]
    assert same["usage"] == out["usage"]
    _, other = await post(session, url, chat_body("something else entirely"))
    assert other["choices"][0]["message"]["content"] != message["content"]
    _, newer = await post(session, url, {**chat_body(), "max_completion_tokens": 2})
    assert newer["usage"]["completion_tokens"] == 2


async def test_chat_stream_chunks(start: Start, session: aiohttp.ClientSession) -> None:
    server = await start("--tokens-per-second", "0")
    url = server.url + "/v1/chat/completions"
    _, plain = await post(session, url, chat_body(max_tokens=4))
    for include_usage in (False, True):
        body = chat_body(max_tokens=4, stream=True, stream_options={"include_usage": include_usage})
        async with session.post(url, json=body) as r:
            assert r.status == 200 and r.content_type == "text/event-stream"
            events = [payload for _, payload in await sse_events(r)]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert len(chunks) == 4 + 2 + include_usage
        assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
        assert len({c["id"] for c in chunks}) == 1
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"]["content"] for c in chunks[1:5])
        assert text == plain["choices"][0]["message"]["content"]
        assert all(c["choices"][0]["finish_reason"] is None and c["choices"][0]["logprobs"] is None for c in chunks[:5])
        assert chunks[5]["choices"][0]["delta"] == {} and chunks[5]["choices"][0]["finish_reason"] == "length"
        if include_usage:
            assert chunks[6]["choices"] == [] and chunks[6]["usage"] == plain["usage"]


async def test_stream_is_paced_token_by_token(start: Start, session: aiohttp.ClientSession) -> None:
    server = await start("--tokens-per-second", "20")
    t0 = time.monotonic()
    body = chat_body(max_tokens=5, stream=True)
    async with session.post(server.url + "/v1/chat/completions", json=body) as r:
        events = await sse_events(r)
    assert len(events) == 5 + 2 + 1
    times = [round(t - t0, 3) for t, _ in events]
    # 20 tokens/s: the role chunk comes at once, then a token every 50 ms, the last about 250 ms in.
    assert times[5] - times[0] >= 0.15, times
    assert times[5] - times[1] >= 0.1, times


async def test_completions(start: Start, session: aiohttp.ClientSession) -> None:
    server = await start("--tokens-per-second", "0")
    url = server.url + "/v1/completions"
    body = {"model": MODEL, "prompt": ["once upon a time", "ignored"], "max_tokens": 3}
    status, out = await post(session, url, body)
    assert status == 200
    assert out["id"].startswith("cmpl-") and out["object"] == "text_completion" and out["model"] == MODEL
    [choice] = out["choices"]
    assert len(choice["text"].split()) == 3
    assert (choice["index"], choice["logprobs"], choice["finish_reason"], choice["stop_reason"]) == (
        0,
        None,
        "length",
        None,
    )
    assert out["usage"] == {"prompt_tokens": 4, "total_tokens": 7, "completion_tokens": 3}
    async with session.post(url, json={**body, "stream": True}) as r:
        events = [payload for _, payload in await sse_events(r)]
    assert events[-1] == "[DONE]" and len(events) == 3 + 1 + 1
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_embeddings_float_and_base64(start: Start, session: aiohttp.ClientSession) -> None:
    server = await start("--embedding-dim", "16")
    url = server.url + "/v1/embeddings"
    body = {"model": MODEL, "input": ["alpha beta", "gamma"]}
    status, floats = await post(session, url, body)
    assert status == 200 and floats["object"] == "list" and floats["model"] == MODEL
    assert floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    vectors = [d["embedding"] for d in floats["data"]]
    assert [(d["object"], d["index"]) for d in floats["data"]] == [("embedding", 0), ("embedding", 1)]
    assert all(len(v) == 16 and math.isclose(math.hypot(*v), 1.0, rel_tol=1e-5) for v in vectors)
    assert vectors[0] != vectors[1]

    _, b64 = await post(session, url, {**body, "encoding_format": "base64"})
    decoded = [list(struct.unpack("<16f", base64.b64decode(d["embedding"]))) for d in b64["data"]]
    assert decoded == vectors  # float32 values, so the two encodings agree exactly

    _, single = await post(session, url, {"model": MODEL, "input": "gamma"})
    assert single["data"][0]["embedding"] == vectors[1]
    _, ids = await post(session, url, {"model": MODEL, "input": [1, 2, 3]})
    assert len(ids["data"]) == 1 and ids["usage"]["prompt_tokens"] == 3


async def test_request_errors_have_vllm_shape(start: Start, session: aiohttp.ClientSession) -> None:
    server = await start()
    url = server.url + "/v1/chat/completions"
    status, out = await post(session, url, {**chat_body(), "model": "nope"})
    assert status == 404
    assert out == {
        "object": "error",
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }
    async with session.post(url, data=b"{not json", headers={"Content-Type": "application/json"}) as r:
        out = await r.json()
        assert r.status == 400
    assert out["object"] == "error" and out["type"] == "BadRequestError" and out["code"] == 400
    bad_bodies = ({"model": MODEL, "messages": "hi"}, {**chat_body(), "n": 2}, chat_body(max_tokens=0))
    for bad in bad_bodies:
        status, out = await post(session, url, bad)
        assert (status, out["type"], out["code"]) == (400, "BadRequestError", 400), bad
    status, _ = await post(session, url, {"messages": []})
    assert status == 404
    status, _ = await post(
        session, server.url + "/v1/embeddings", {"model": MODEL, "input": "x", "encoding_format": "hex"}
    )
    assert status == 400


async def test_startup_delay_keeps_port_closed(start: Start, session: aiohttp.ClientSession) -> None:
    t0 = time.monotonic()
    server = await start(env={"SIM_STARTUP_DELAY": "0.6"}, wait=False)
    deadline = time.monotonic() + 10
    while "Starting to load model" not in server.log():
        assert time.monotonic() < deadline, server.log()
        await asyncio.sleep(0.02)
    with pytest.raises(OSError):  # loading: nothing listens yet
        await asyncio.open_connection("127.0.0.1", server.port)
    await server.wait_healthy(session)
    assert time.monotonic() - t0 >= 0.6


async def test_crash_after_exits_with_1(start: Start, session: aiohttp.ClientSession) -> None:
    server = await start("--crash-after", "2", "--tokens-per-second", "0")
    url = server.url + "/v1/chat/completions"
    status, _ = await post(session, url, chat_body())
    assert status == 200
    try:
        await post(session, url, chat_body())  # the second request may or may not be answered
    except aiohttp.ClientError:
        pass
    assert await server.wait_exit() == 1
    assert "CUDA error" in server.log()


async def test_crash_through_control(start: Start, session: aiohttp.ClientSession) -> None:
    server = await start()
    status, out = await post(session, server.url + "/sim/control", {"crash": True})
    assert status == 200 and out["ok"] is True
    assert await server.wait_exit() == 1


async def test_hang_after_stops_answering_but_stays_up(start: Start, session: aiohttp.ClientSession) -> None:
    server = await start("--hang-after", "1", "--tokens-per-second", "0")
    status, _ = await post(session, server.url + "/v1/chat/completions", chat_body())
    assert status == 200
    with pytest.raises(TimeoutError):
        async with session.get(server.url + "/health", timeout=aiohttp.ClientTimeout(total=0.5)):
            pass
    assert server.proc.returncode is None
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)  # the port is still open
    writer.close()
    # SIGTERM still stops it promptly and cleanly, with a request stuck inside.
    stuck = asyncio.create_task(post(session, server.url + "/v1/embeddings", {"model": MODEL, "input": "a"}))
    await asyncio.sleep(0.1)
    server.proc.send_signal(signal.SIGTERM)
    assert await server.wait_exit(3.0) == 0
    with pytest.raises(aiohttp.ClientError):
        await stuck


async def test_hang_inference_keeps_probes_answering(start: Start, session: aiohttp.ClientSession) -> None:
    """A wedged engine behind a live API server: health, models and metrics answer; inference
    requests are accepted, held as running, and go on when the hang is lifted."""
    server = await start("--hang-inference", "--tokens-per-second", "0")
    chat = server.url + "/v1/chat/completions"
    async with session.get(server.url + "/health") as r:
        assert r.status == 200
    held = asyncio.create_task(post(session, chat, chat_body()))
    with pytest.raises(TimeoutError):
        async with session.post(chat, json=chat_body(stream=True), timeout=aiohttp.ClientTimeout(total=0.5)) as r:
            assert r.status == 200  # SSE headers go out at once, as vLLM's do; no token follows
            await r.content.readany()
    async with session.get(server.url + "/metrics") as r:
        assert sample(await r.text(), "vllm:num_requests_running") >= 1
    assert not held.done()
    assert (await post(session, server.url + "/sim/control", {"hang_inference": False}))[0] == 200
    status, out = await asyncio.wait_for(held, 5)
    assert status == 200 and out["choices"]


async def test_control_injects_and_lifts_faults(start: Start, session: aiohttp.ClientSession) -> None:
    server = await start("--tokens-per-second", "0", "--seed", "1")
    control, chat = server.url + "/sim/control", server.url + "/v1/chat/completions"
    status, out = await post(session, control, {"error_rate": 1})
    assert status == 200 and out["ok"] is True and out["settings"]["error_rate"] == 1.0
    for _ in range(3):
        status, out = await post(session, chat, chat_body())
        assert (status, out["type"], out["code"]) == (500, "InternalServerError", 500)
    assert (await post(session, server.url + "/v1/embeddings", {"model": MODEL, "input": "x"}))[0] == 500
    await post(session, control, {"error_rate": 0, "fail_health": True})
    assert (await post(session, chat, chat_body()))[0] == 200
    async with session.get(server.url + "/health") as r:
        assert r.status == 500
    await post(session, control, {"fail_health": False, "hang": True})
    with pytest.raises(TimeoutError):
        async with session.get(server.url + "/health", timeout=aiohttp.ClientTimeout(total=0.3)):
            pass
    await post(session, control, {"hang": False})
    async with session.get(server.url + "/health") as r:
        assert r.status == 200
    for bad in ({"error_rate": 2}, {"bogus": 1}, {"hang": "yes"}, [1]):
        assert (await post(session, control, bad))[0] == 400, bad
    async with session.get(control) as r:
        state = await r.json()
    assert state["counters"]["inference_requests"] == 5 and state["counters"]["successes"] == 1


async def test_metrics_count_running_and_waiting(start: Start, session: aiohttp.ClientSession) -> None:
    server = await start("--max-num-seqs", "1", "--tokens-per-second", "40")

    async def metrics() -> str:
        async with session.get(server.url + "/metrics") as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return await r.text()

    text = await metrics()
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens",
        "vllm:generation_tokens",
        "vllm:request_success",
        "vllm:time_to_first_token_seconds",
    ):
        assert f"# TYPE {name} " in text and f"# HELP {name} " in text
    assert f'vllm:num_requests_running{{model_name="{MODEL}"}} 0.0' in text

    # Two 0.5 s requests with one sequence slot: one runs while the other waits.
    url = server.url + "/v1/chat/completions"
    tasks = [asyncio.create_task(post(session, url, chat_body(max_tokens=20))) for _ in range(2)]
    deadline = time.monotonic() + 5
    while True:
        text = await metrics()
        if (sample(text, "vllm:num_requests_running"), sample(text, "vllm:num_requests_waiting")) == (1, 1):
            break
        assert time.monotonic() < deadline, text
        await asyncio.sleep(0.02)
    assert sample(text, "vllm:kv_cache_usage_perc") == 1.0
    assert [status for status, _ in await asyncio.gather(*tasks)] == [200, 200]
    text = await metrics()
    assert sample(text, "vllm:num_requests_running") == 0 and sample(text, "vllm:num_requests_waiting") == 0
    assert sample(text, "vllm:generation_tokens_total") == 40
    assert sample(text, "vllm:prompt_tokens_total") == 12
    assert sample(text, "vllm:request_success_total") == 2
    assert 'finished_reason="length"' in text
    assert sample(text, "vllm:time_to_first_token_seconds_count") == 2
    assert re.search(r'^vllm:time_to_first_token_seconds_bucket\{le="\+Inf",.*\} 2\.0$', text, re.MULTILINE)


async def test_disconnect_frees_the_sequence(start: Start, session: aiohttp.ClientSession) -> None:
    server = await start("--tokens-per-second", "20")
    body = chat_body(max_tokens=200, stream=True)
    resp = await session.post(server.url + "/v1/chat/completions", json=body)
    await resp.content.readline()  # the role chunk has arrived: the request is running
    resp.close()  # hang up mid-stream
    deadline = time.monotonic() + 5
    while True:
        async with session.get(server.url + "/sim/control") as r:
            counters = (await r.json())["counters"]
        if counters["running"] == 0:
            break
        assert time.monotonic() < deadline, counters
        await asyncio.sleep(0.02)
    assert counters["generation_tokens"] < 200 and counters["successes"] == 0
