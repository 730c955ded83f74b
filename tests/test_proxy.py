"""The agent's OpenAI-compatible proxy, driven by the official ``openai`` SDK and raw HTTP.

One agent with two instances of one model (plus a slow one, an embedding one and one that is
never ready) serves the tests that do not disturb it; tests that kill or reconfigure instances
start their own agent.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from helpers import (
    AgentProcess,
    agent_toml,
    free_port,
    instance_toml,
    start_agent_sync,
    wait_until,
)

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    tmp = tmp_path_factory.mktemp("proxy")
    port = free_port()
    instances = (
        instance_toml("q1", model="qwen", args='["--tokens-per-second", "0"]')
        + instance_toml("q2", model="qwen", args='["--tokens-per-second", "0"]')
        + instance_toml("slow", model="slow", args='["--tokens-per-second", "20"]')
        + instance_toml("emb", model="embedder", extra='warmup = { kind = "embedding" }')
        + instance_toml("never", model="never", args='["--startup-delay", "600"]')
        + instance_toml("laggy", model="laggy", extra="warmup = { enabled = false }")
    )
    proxy = """
[proxy]
max_body_bytes = 65536
ttfb_timeout_s = 1.0
total_timeout_s = 5.0
[proxy.limits.slow]
max_concurrency = 1
max_queue = 1
"""
    a = start_agent_sync(tmp, agent_toml(tmp, port, instances + proxy), port, ready_instances=5)
    yield a
    a.stop()


@pytest.fixture
def client(agent: AgentProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=agent.base + "/v1", api_key="unused", max_retries=0)


async def test_sdk_chat_non_streaming(client: openai.AsyncOpenAI) -> None:
    r = await client.chat.completions.create(
        model="qwen", messages=[{"role": "user", "content": "hello there"}], max_tokens=7
    )
    assert r.object == "chat.completion" and r.model == "qwen"
    assert r.usage is not None and r.usage.completion_tokens == 7
    assert len((r.choices[0].message.content or "").split()) == 7


async def test_sdk_chat_streaming(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="qwen",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 5
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


async def test_sdk_completions_and_embeddings(client: openai.AsyncOpenAI) -> None:
    c = await client.completions.create(model="qwen", prompt="once upon", max_tokens=3)
    assert len(c.choices[0].text.split()) == 3
    # The SDK asks for base64 by default; bytes pass through the proxy untouched.
    e = await client.embeddings.create(model="embedder", input=["a", "b"])
    assert len(e.data) == 2 and len(e.data[0].embedding) == 384
    f = await client.embeddings.create(model="embedder", input="a", encoding_format="float")
    assert f.data[0].embedding == pytest.approx(e.data[0].embedding)


async def test_models_lists_only_ready_models(client: openai.AsyncOpenAI) -> None:
    ids = sorted(m.id for m in (await client.models.list()).data)
    assert ids == ["embedder", "laggy", "qwen", "slow"]  # "never" is still loading


async def test_error_shapes(agent: AgentProcess, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        await client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert nf.value.body["code"] == "model_not_found"  # type: ignore[index]
    async with aiohttp.ClientSession() as http:
        cases = [
            (b"{not json", 400, "invalid_json"),
            (b'{"messages": []}', 400, "missing_model"),
            (b'{"model": ""}', 400, "missing_model"),
            (b'{"model": 42}', 400, "invalid_request"),
            (b"[1, 2]", 400, "invalid_request"),
            (b'{"model": "q", "x": "' + b"a" * 70000 + b'"}', 413, "body_too_large"),
        ]
        for body, status, code in cases:
            async with http.post(agent.base + CHAT, data=body, headers={"Content-Type": "application/json"}) as r:
                doc = await r.json()
                assert (r.status, doc["error"]["code"]) == (status, code), body[:40]
                assert set(doc["error"]) == {"message", "type", "code"}
                assert r.headers["X-Request-ID"]
        async with http.post(agent.base + CHAT, json={"model": "never", "messages": []}) as r:
            assert r.status == 503 and r.headers["Retry-After"] == "2"
            assert (await r.json())["error"]["code"] == "model_not_ready"


async def test_request_id_is_kept_and_logged(agent: AgentProcess) -> None:
    async with aiohttp.ClientSession() as http:
        body = {"model": "qwen", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        async with http.post(agent.base + CHAT, json=body, headers={"X-Request-ID": "req-abc-123"}) as r:
            assert r.status == 200 and r.headers["X-Request-ID"] == "req-abc-123"

    def logged() -> dict | None:
        for line in agent.log_lines():
            if '"req-abc-123"' in line:
                return json.loads(line)
        return None

    entry = await wait_until(logged, what="access log line")
    assert entry["event"] == "request" and entry["model"] == "qwen" and entry["status"] == 200
    assert entry["instance"] in ("q1", "q2") and entry["retries"] == 0
    assert entry["ttfb_ms"] > 0 and entry["duration_ms"] >= entry["ttfb_ms"]


async def test_sse_headers_and_chunks_arrive_as_generated(agent: AgentProcess) -> None:
    body = {"model": "slow", "messages": [{"role": "user", "content": "x"}], "max_tokens": 6, "stream": True}
    arrivals: list[float] = []
    chunks: list[bytes] = []
    async with aiohttp.ClientSession() as http, http.post(agent.base + CHAT, json=body) as r:
        assert r.headers["Cache-Control"] == "no-cache" and r.headers["X-Accel-Buffering"] == "no"
        assert r.headers["Content-Type"].startswith("text/event-stream")
        t0 = time.monotonic()
        async for chunk in r.content.iter_any():
            arrivals.append(time.monotonic() - t0)
            chunks.append(chunk)
    events = b"".join(chunks).split(b"\n\n")
    assert events[-2] == b"data: [DONE]" and len([e for e in events if e]) == 6 + 3
    # 20 tokens/s: the stream spans ~0.3 s and its first bytes came long before its last.
    assert arrivals[-1] - arrivals[0] > 0.2
    assert len(chunks) >= 5  # not buffered into one write


async def test_client_disconnect_cancels_upstream(agent: AgentProcess) -> None:
    st = await _status(agent)
    slow = next(i for i in st["instances"] if i["name"] == "slow")
    metrics_url = f"http://127.0.0.1:{slow['port']}/metrics"
    body = {"model": "slow", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000, "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(agent.base + CHAT, json=body) as r:
            await r.content.readline()
            assert await _running(http, metrics_url) == 1.0
            r.close()  # drop the connection mid-stream
        await wait_until(lambda: _running(http, metrics_url, want=0.0), timeout=10, what="upstream request cancelled")


async def _running(http: aiohttp.ClientSession, url: str, want: float | None = None) -> float | bool:
    async with http.get(url) as r:
        for line in (await r.text()).splitlines():
            if line.startswith("vllm:num_requests_running"):
                value = float(line.rsplit(" ", 1)[1])
                return value == want if want is not None else value
    raise AssertionError("no vllm:num_requests_running")


async def _status(agent: AgentProcess) -> dict:
    async with aiohttp.ClientSession() as http, http.get(agent.base + "/v1/status") as r:
        return await r.json()


async def test_concurrency_limit_queues_then_429(agent: AgentProcess) -> None:
    body = {"model": "slow", "messages": [{"role": "user", "content": "x"}], "max_tokens": 8}
    async with aiohttp.ClientSession() as http:

        async def one() -> tuple[int, str | None]:
            async with http.post(agent.base + CHAT, json=body) as r:
                await r.read()
                return r.status, r.headers.get("Retry-After")

        results = await asyncio.gather(*(one() for _ in range(4)))
    statuses = sorted(s for s, _ in results)
    # limit 1 + queue 1: two are served (one after the other), two are refused at once.
    assert statuses == [200, 200, 429, 429]
    assert all(ra == "2" for s, ra in results if s == 429)


async def test_ttfb_timeout_gives_504(agent: AgentProcess) -> None:
    st = await _status(agent)
    laggy = next(i for i in st["instances"] if i["name"] == "laggy")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{laggy['port']}/sim/control", json={"latency_ms": 3000}) as r:
            assert r.status == 200
        t0 = time.monotonic()
        body = {"model": "laggy", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "stream": True}
        async with http.post(agent.base + CHAT, json=body) as r:
            assert r.status == 504
            assert (await r.json())["error"]["message"] == "upstream timeout: no first chunk within 1s"
        assert time.monotonic() - t0 < 3.0
        async with http.post(f"http://127.0.0.1:{laggy['port']}/sim/control", json={"latency_ms": 0}) as r:
            assert r.status == 200


async def test_proxy_metrics(agent: AgentProcess) -> None:
    async with aiohttp.ClientSession() as http, http.get(agent.base + "/metrics") as r:
        text = await r.text()
    assert 'gpu_agent_proxy_requests_total{code="200",model="qwen"}' in text
    assert 'gpu_agent_proxy_requests_total{code="404",model="_unknown"}' in text
    assert "gpu_agent_proxy_request_duration_seconds_bucket{" in text
    assert "gpu_agent_proxy_time_to_first_byte_seconds_count{" in text
    assert 'gpu_agent_proxy_in_flight_requests{model="qwen"} 0.0' in text
    # The response cache (used from degradation level 1) and the limited models' queues.
    assert 'gpu_agent_proxy_cache_lookups_total{result="hit"}' in text
    assert "gpu_agent_proxy_cache_entries " in text
    assert 'gpu_agent_proxy_queued_requests{model="slow"}' in text


# --- tests with their own agent: faults ---------------------------------------------------------


async def test_5xx_before_first_byte_is_retried_on_another_instance(tmp_path: Path) -> None:
    port = free_port()
    cfg = agent_toml(tmp_path, port, instance_toml("bad", model="m") + instance_toml("good", model="m"))
    async with AgentProcess(tmp_path, cfg, port) as agent:
        bad = await agent.wait_state("bad", "READY")
        await agent.wait_state("good", "READY")
        assert agent.http is not None
        async with agent.http.post(f"http://127.0.0.1:{bad['port']}/sim/control", json={"error_rate": 1.0}) as r:
            assert r.status == 200
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        for _ in range(10):
            async with agent.http.post(agent.base + CHAT, json=body) as r:
                assert r.status == 200
        async with agent.http.get(agent.base + "/metrics") as r:
            text = await r.text()
        assert 'gpu_agent_proxy_upstream_errors_total{instance="bad",kind="status_5xx",model="m"}' in text
        assert 'gpu_agent_proxy_retries_total{model="m"}' in text


async def test_no_request_fails_when_an_instance_is_killed_during_a_burst(tmp_path: Path) -> None:
    port = free_port()
    inst = instance_toml("a", model="m", args='["--tokens-per-second", "400"]') + instance_toml(
        "b", model="m", args='["--tokens-per-second", "400"]'
    )
    async with AgentProcess(tmp_path, agent_toml(tmp_path, port, inst), port) as agent:
        a = await agent.wait_state("a", "READY")
        await agent.wait_state("b", "READY")
        client = openai.AsyncOpenAI(base_url=agent.base + "/v1", api_key="x", max_retries=0)
        failures: list[BaseException] = []
        done = 0

        async def worker() -> None:
            nonlocal done
            for _ in range(15):
                try:
                    r = await client.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": "x"}], max_tokens=20
                    )
                    assert r.choices[0].message.content
                    done += 1
                except Exception as e:  # any failure is a test failure, collected to report all
                    failures.append(e)

        async def killer() -> None:
            await wait_until(lambda: done >= 40, timeout=60, interval=0.005, what="burst under way")
            os.kill(a["pid"], signal.SIGKILL)

        await asyncio.gather(killer(), *(worker() for _ in range(16)))
        assert failures == []
        assert done == 16 * 15
        await client.close()


async def test_upstream_dying_mid_stream_ends_with_an_sse_error_event(tmp_path: Path) -> None:
    port = free_port()
    cfg = agent_toml(tmp_path, port, instance_toml("a", model="m", args='["--tokens-per-second", "20"]'))
    async with AgentProcess(tmp_path, cfg, port) as agent:
        a = await agent.wait_state("a", "READY")
        assert agent.http is not None
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 200, "stream": True}
        async with agent.http.post(agent.base + CHAT, json=body) as r:
            assert r.status == 200
            first = await r.content.readline()
            assert first.startswith(b"data: ")
            os.kill(a["pid"], signal.SIGKILL)
            rest = await r.content.read()
        events = [e.strip() for e in rest.split(b"\n\n") if e.strip()]
        last = json.loads(events[-1].removeprefix(b"data: "))
        assert last["error"]["code"] == "upstream_stream_error"
        assert b"[DONE]" not in rest


async def test_task_routes_send_images_to_their_group(tmp_path: Path) -> None:
    port = free_port()
    inst = "".join(instance_toml(n, model="vl") for n in ("vl-img", "vl-doc", "vl-any"))
    routes = """
[[proxy.task_routes]]
model = "vl"
task = "image"
instances = ["vl-img"]
[[proxy.task_routes]]
model = "vl"
task = "document"
instances = ["vl-doc"]
[[proxy.task_routes]]
model = "vl"
task = "text"
instances = ["vl-any"]
"""
    async with AgentProcess(tmp_path, agent_toml(tmp_path, port, inst + routes), port) as agent:
        for n in ("vl-img", "vl-doc", "vl-any"):
            await agent.wait_state(n, "READY")
        image = [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "data:,x"}}]
        doc = [{"type": "file", "file": {"filename": "a.pdf", "file_data": "data:,x"}}]
        assert agent.http is not None
        for content, rid in ((image, "r-img"), (doc, "r-doc"), ("plain", "r-any"), (image, "r-img2")):
            body = {"model": "vl", "messages": [{"role": "user", "content": content}], "max_tokens": 1}
            async with agent.http.post(agent.base + CHAT, json=body, headers={"X-Request-ID": rid}) as r:
                assert r.status == 200

        def routed() -> dict[str, str] | None:
            got = {}
            for line in agent.log_lines():
                e = json.loads(line)
                if e["event"] == "request":
                    got[e["request_id"]] = e["instance"]
            return got if len(got) >= 4 else None

        assert await wait_until(routed) == {"r-img": "vl-img", "r-doc": "vl-doc", "r-any": "vl-any", "r-img2": "vl-img"}


async def test_total_timeout_mid_stream_and_non_stream(tmp_path: Path) -> None:
    port = free_port()
    inst = instance_toml("a", model="m", args='["--tokens-per-second", "10"]')
    proxy = "\n[proxy]\nttfb_timeout_s = 0.5\ntotal_timeout_s = 1.0\n"
    async with AgentProcess(tmp_path, agent_toml(tmp_path, port, inst + proxy), port) as agent:
        await agent.wait_state("a", "READY")
        assert agent.http is not None
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100, "stream": True}
        t0 = time.monotonic()
        async with agent.http.post(agent.base + CHAT, json=body) as r:
            assert r.status == 200
            text = await r.read()
        assert time.monotonic() - t0 < 5
        last = json.loads(text.strip().split(b"\n\n")[-1].removeprefix(b"data: "))
        assert last["error"]["message"] == "total timeout exceeded mid-stream"
        async with agent.http.post(agent.base + CHAT, json={**body, "stream": False}) as r:
            assert r.status == 504
            assert (await r.json())["error"]["message"] == "upstream timeout: no complete answer within 1s"


async def test_stream_that_stalls_after_its_first_token_ends_with_an_error_event(tmp_path: Path) -> None:
    """An engine step stuck mid-generation: the stream has begun (nothing can be retried), so it
    ends stream_idle_timeout_s after the last chunk with an error event, counted as the
    instance's timeout, instead of hanging until the total deadline."""
    port = free_port()
    inst = instance_toml("a", model="m", args='["--tokens-per-second", "20"]')
    proxy = "\n[proxy]\nstream_idle_timeout_s = 0.5\n"
    async with AgentProcess(tmp_path, agent_toml(tmp_path, port, inst + proxy), port) as agent:
        a = await agent.wait_state("a", "READY")
        assert agent.http is not None
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 200, "stream": True}
        async with agent.http.post(agent.base + CHAT, json=body) as r:
            assert r.status == 200
            first = await r.content.readany()
            assert first.startswith(b"data: ")
            control = f"http://127.0.0.1:{a['port']}/sim/control"
            async with agent.http.post(control, json={"hang_inference": True}) as c:
                assert c.status == 200
            t0 = time.monotonic()
            rest = await r.read()
            waited = time.monotonic() - t0
        assert waited < 5, waited  # the total deadline is 900 s
        last = json.loads(rest.strip().split(b"\n\n")[-1].removeprefix(b"data: "))
        assert last["error"]["message"] == "upstream sent nothing for 0.5s mid-stream"
        assert (await agent.instance("a"))["errors_total"] >= 1
        async with agent.http.get(agent.base + "/metrics") as m:
            assert 'kind="timeout"' in await m.text()
        async with agent.http.post(control, json={"hang_inference": False}) as c:
            assert c.status == 200


async def test_non_streaming_answer_past_its_limit_is_retried_on_the_sibling(tmp_path: Path) -> None:
    """response_timeout_s is the first-byte limit of a non-streaming request: an instance that
    sits on it is abandoned, counted as an error and a timeout, and the sibling answers."""
    port = free_port()
    inst = instance_toml("a", model="m") + instance_toml("b", model="m")
    proxy = "\n[proxy]\nresponse_timeout_s = 0.5\n"
    async with AgentProcess(tmp_path, agent_toml(tmp_path, port, inst + proxy), port) as agent:
        a = await agent.wait_state("a", "READY")
        await agent.wait_state("b", "READY")
        assert agent.http is not None
        async with agent.http.post(f"http://127.0.0.1:{a['port']}/sim/control", json={"latency_ms": 5000}) as r:
            assert r.status == 200
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        for _ in range(2):  # ties rotate: one of the two starts on a
            t0 = time.monotonic()
            async with agent.http.post(agent.base + CHAT, json=body) as r:
                assert r.status == 200
            assert time.monotonic() - t0 < 3.0
        assert (await agent.instance("a"))["errors_total"] >= 1
        async with agent.http.get(agent.base + "/metrics") as r:
            text = await r.text()
        assert 'gpu_agent_proxy_upstream_errors_total{instance="a",kind="timeout",model="m"} 1.0' in text


async def test_stream_whose_upstream_dies_before_the_first_chunk_is_retried(tmp_path: Path) -> None:
    """Servers send SSE headers at once; until the first chunk nothing has reached the client,
    so an upstream dying in prefill is retried on another instance, invisibly."""
    port = free_port()
    inst = instance_toml("a", model="m") + instance_toml("b", model="m")
    async with AgentProcess(tmp_path, agent_toml(tmp_path, port, inst), port) as agent:
        insts = {n: await agent.wait_state(n, "READY") for n in ("a", "b")}
        assert agent.http is not None
        for i in insts.values():  # a long "prefill" on both, so whichever is picked first is mid-prefill
            async with agent.http.post(f"http://127.0.0.1:{i['port']}/sim/control", json={"latency_ms": 1500}) as r:
                assert r.status == 200
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True}

        async def kill_busy_one() -> str:
            async def busy() -> str | None:
                for name, i in insts.items():
                    if await _running(agent.http, f"http://127.0.0.1:{i['port']}/metrics") == 1.0:  # type: ignore[arg-type]
                        return name
                return None

            name = await wait_until(busy, timeout=10, interval=0.02, what="a request in prefill")
            os.kill(insts[name]["pid"], signal.SIGKILL)
            return name

        async def request() -> bytes:
            async with agent.http.post(agent.base + CHAT, json=body) as r:  # type: ignore[union-attr]
                assert r.status == 200
                return await r.read()

        killed, text = await asyncio.gather(kill_busy_one(), request())
        assert text.endswith(b"data: [DONE]\n\n") and b'"error"' not in text
        # The access-log line is written just after the response ends: wait for it.
        entry = await wait_until(
            lambda: next((json.loads(ln) for ln in agent.log_lines() if '"event":"request"' in ln), None),
            what="access log line",
        )
        assert entry["retries"] == 1 and entry["instance"] != killed


# --- abandoning an attempt whose instance leaves rotation (no agent needed) -----------------------


class _Inst:
    name = "a"

    def __init__(self) -> None:
        self.watchers: set[Callable[[], None]] = set()

    def watch(self, on_leave: Callable[[], None]) -> None:
        self.watchers.add(on_leave)

    def unwatch(self, on_leave: Callable[[], None]) -> None:
        self.watchers.discard(on_leave)

    def leave(self) -> None:
        for w in list(self.watchers):
            w()


async def test_an_attempt_is_abandoned_when_its_instance_leaves_before_answering() -> None:
    from agent.proxy.context import Failure
    from agent.proxy.dispatch import AbandonIfGone

    inst, finish, cancelled = _Inst(), asyncio.Event(), []
    answered = False

    async def attempt() -> str:
        try:
            await finish.wait()  # a frozen server: connected, nothing comes back
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return "answer"

    async def run() -> str:
        try:
            with AbandonIfGone(inst, inst.name, "instance_down", lambda: answered):
                return await attempt()
        finally:
            # Our own cancellation was taken back: the request's task goes on (to a retry).
            assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]

    task = asyncio.ensure_future(run())
    await asyncio.sleep(0)
    inst.leave()
    with pytest.raises(Failure) as e:
        await task
    assert e.value.kind == "instance_down" and cancelled == [True] and not inst.watchers

    # Once it has answered (a stream under way), leaving changes nothing.
    answered = True
    task = asyncio.ensure_future(run())
    await asyncio.sleep(0)
    inst.leave()
    finish.set()
    assert await task == "answer"


async def test_a_client_leaving_as_the_instance_leaves_is_still_a_cancellation() -> None:
    from agent.proxy.dispatch import AbandonIfGone

    inst = _Inst()

    async def run() -> None:
        with AbandonIfGone(inst, inst.name, "instance_down", lambda: False):
            await asyncio.Event().wait()

    task = asyncio.ensure_future(run())
    await asyncio.sleep(0)
    inst.leave()
    task.cancel()  # the client disconnected in the same loop turn: nobody to retry for
    with pytest.raises(asyncio.CancelledError):
        await task
