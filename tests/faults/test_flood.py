"""A slowloris flood at a low open-file limit: the API stays reachable.

A real agent runs with RLIMIT_NOFILE 256 soft / 512 hard (it raises the soft limit to the hard
one at start-up) and ``[api]`` timeouts of 2 s. Slow clients open connections and trickle header
bytes, never finishing a request; others send a head and then a body far too slowly. Asserted
from the outside: connections that never complete their head are closed with a 408 once the
header timeout passes, a slow body likewise; past the connection cap (under the open-file limit)
new connections evict the slow ones, with one log line when shedding starts and one when it
ends and a counter in /metrics; a normal client gets its answers throughout, and nothing
crashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import AgentProcess, agent_toml, free_port, instance_toml, wait_until

HEADER_TIMEOUT_S = 2.0
SOFT, HARD = 256, 512
FD_RESERVE = 128
CAP = (HARD - FD_RESERVE) // 2  # the agent holds 2 descriptors per proxied request
API = f"""
[api]
header_timeout_s = {HEADER_TIMEOUT_S}
body_timeout_s = {HEADER_TIMEOUT_S}
body_min_rate = 1024
fd_reserve = {FD_RESERVE}
"""


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    port = free_port()
    config = agent_toml(tmp_path, port, instance_toml("m", model="m") + API)
    a = AgentProcess(tmp_path, config, port, wrapper=["prlimit", f"--nofile={SOFT}:{HARD}", "--"])
    yield a
    a.stop()


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before closing (b"" for a bare close or a reset)."""
    with contextlib.suppress(ConnectionError):
        return await reader.read()
    return b""


async def slow_head(port: int, hold_s: float) -> tuple[float, bytes]:
    """Send a request head a header line at a time, never the blank line that ends it; how long
    the server kept the connection, and what it answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    opened = time.monotonic()
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    closed = asyncio.ensure_future(read_answer(reader))
    try:
        while not closed.done() and time.monotonic() - opened < hold_s:
            with contextlib.suppress(ConnectionError):
                writer.write(b"X-Slow: 1\r\n")
            await asyncio.wait([closed], timeout=0.5)
        answer = await asyncio.wait_for(closed, 1) if closed.done() else b"(still open)"
        return time.monotonic() - opened, answer
    finally:
        closed.cancel()
        writer.close()


async def flood(port: int, sockets: int, until: float) -> int:
    """``sockets`` slowloris connections kept open until ``until``: each one that is closed is
    opened again (50 ms later). The number of connections opened."""
    opened = 0

    async def one() -> None:
        nonlocal opened
        while time.monotonic() < until:
            opened += 1
            with contextlib.suppress(OSError, TimeoutError):
                await slow_head(port, until - time.monotonic())
            await asyncio.sleep(0.05)  # an attacker's reconnect pace, not a wait for a condition

    await asyncio.gather(*(one() for _ in range(sockets)))
    return opened


async def normal_requests(agent: AgentProcess, until: float) -> list[tuple[int, float, int]]:
    """Chat completions on a fresh connection each (what a new client does), retried once on a
    connection error or a 503 as the OpenAI SDK does, after its back-off: the answer's
    Retry-After, else half a second (its initial delay): (status, seconds, attempts) per request.
    A refusal at the cap comes while a burst of the flood's reconnects is being accepted; a retry
    at once would land in the same burst."""
    import aiohttp

    out: list[tuple[int, float, int]] = []
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True), timeout=timeout) as http:
        while time.monotonic() < until:
            t0 = time.monotonic()
            status, attempts, backoff = -1, 0, 0.5
            while attempts < 2 and status in (-1, 503):
                if attempts:
                    await asyncio.sleep(backoff)  # the client's back-off, not a wait for a condition
                attempts += 1
                backoff = 0.5
                try:
                    async with http.post(agent.base + "/v1/chat/completions", json=body) as r:
                        await r.read()
                        status = r.status
                        backoff = float(r.headers.get("Retry-After", backoff))
                except (aiohttp.ClientError, TimeoutError) as e:
                    print("normal request failed:", repr(e))
            out.append((status, time.monotonic() - t0, attempts))
            await asyncio.sleep(0.1)  # a client's pace
    return out


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert m, f"{name}{labels} not in /metrics"
    return float(m.group(1))


def events(agent: AgentProcess, name: str) -> list[dict[str, object]]:
    return [doc for doc in map(json.loads, agent.log_lines()) if doc.get("event") == name]


async def test_slowloris_flood_at_a_low_fd_limit(agent: AgentProcess) -> None:
    async with agent:
        await agent.wait_state("m", "READY", timeout=30)
        limit = events(agent, "open-file limit")[0]
        assert (limit["soft_before"], limit["soft"], limit["max_connections"]) == (SOFT, HARD, CAP)

        # Under the cap: slow heads and a slow body are closed, with a 408, once their time is up.
        heads = [slow_head(agent.port, hold_s=10) for _ in range(20)]
        results = await asyncio.gather(*heads, slow_body(agent.port))
        print(
            f"slow heads closed after {min(h for h, _ in results[:-1]):.2f}-{max(h for h, _ in results[:-1]):.2f}s, "
            f"the slow body after {results[-1][0]:.2f}s"
        )
        for held, answer in results:
            assert HEADER_TIMEOUT_S - 0.1 <= held < HEADER_TIMEOUT_S + 3, held
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]

        # The flood: 2x the cap, kept up for 3 header timeouts, while a normal client asks.
        t0 = time.monotonic()
        until = t0 + 3 * HEADER_TIMEOUT_S
        opened, answers = await asyncio.gather(flood(agent.port, 2 * CAP, until), normal_requests(agent, until))
        assert agent.proc is not None and agent.proc.poll() is None
        statuses = [s for s, _, _ in answers]
        worst = max(t for _, t, _ in answers)
        retried = sum(n > 1 for _, _, n in answers)
        mean = sum(t for _, t, _ in answers) / len(answers)
        print(
            f"flood: {opened} slow connections in {time.monotonic() - t0:.1f}s; normal requests {len(answers)}, "
            f"{retried} retried, worst {worst * 1000:.0f} ms, mean {mean * 1000:.0f} ms"
        )
        assert statuses and set(statuses) == {200}, answers
        assert worst < 2.0 and retried <= len(answers) // 5, answers

        # One line when shedding started, one when the connections fell back under the cap.
        await wait_until(lambda: events(agent, "connections back under the cap"), timeout=10, what="episode end")
        assert (
            len(events(agent, "connection cap reached: new connections evict those waiting longest without a request"))
            == 1
        )
        async with agent.http.get(agent.base + "/metrics") as r:  # type: ignore[union-attr]
            text = await r.text()
        print(
            "shed:",
            {
                k: metric(text, "gpu_agent_http_connections_shed_total", f'{{reason="{k}"}}')
                for k in ("evicted", "refused")
            },
        )
        assert metric(text, "gpu_agent_http_connections_limit") == CAP
        assert metric(text, "gpu_agent_http_connections_shed_total", '{reason="evicted"}') > 0
        assert metric(text, "gpu_agent_http_request_timeouts_total", '{phase="header"}') >= 20
        assert metric(text, "gpu_agent_http_request_timeouts_total", '{phase="body"}') >= 1
        assert (await agent.status())["instances"][0]["state"] == "READY"
    for doc in map(json.loads, agent.log_lines()):
        assert doc.get("level") not in ("error", "critical"), doc


async def slow_body(port: int) -> tuple[float, bytes]:
    """A complete head, then a body far slower than body_min_rate: closed with a 408."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    opened = time.monotonic()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n{"
    )
    closed = asyncio.ensure_future(read_answer(reader))
    try:
        while not closed.done() and time.monotonic() - opened < 10:
            with contextlib.suppress(ConnectionError):
                writer.write(b" ")
            await asyncio.wait([closed], timeout=0.5)
        return time.monotonic() - opened, await asyncio.wait_for(closed, 1)
    finally:
        closed.cancel()
        writer.close()
