"""Load generators of bench/proxy.py: a blocking keep-alive client for c=1 latency and SSE first
events, wrk for max req/s, and the many-streams client.

The clients parse responses with httptools (llhttp, C) on raw sockets or asyncio Protocols:
aiohttp's client costs more CPU per request than some of the proxies measured, and the client
shares its core with the backend. The stream client runs in several processes on uvloop; each
counts ``data:`` lines as they arrive and keeps the gap since the stream's previous event.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import resource
import socket
import subprocess
import time
from array import array
from pathlib import Path
from urllib.parse import urlsplit

import httptools
import uvloop

MARK = b"data:"


def body(model: str, *, stream: bool = False, max_tokens: int = 1) -> bytes:
    doc = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens}
    if stream:
        doc["stream"] = True
    return json.dumps(doc).encode()


def request(base: str, payload: bytes, path: str = "/v1/chat/completions") -> bytes:
    host = urlsplit(base).netloc.encode()
    return (
        b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nAccept: */*\r\nContent-Length: %d\r\n\r\n%s"
        % (path.encode(), host, len(payload), payload)
    )


class _Response:
    """httptools callbacks: status, whole-message flag, time of the first ``data:`` and count."""

    def __init__(self) -> None:
        self.done = False
        self.events = 0
        self.first_event = 0.0
        self.tail = b""

    def on_body(self, data: bytes) -> None:
        n = (self.tail + data).count(MARK)
        if n and not self.events:
            self.first_event = time.perf_counter()
        self.events += n
        self.tail = data[-(len(MARK) - 1) :]

    def on_message_complete(self) -> None:
        self.done = True


class BlockingClient:
    """One keep-alive connection; ``send`` returns (status, seconds to the whole answer, seconds
    to the first ``data:`` line or 0, ``data:`` lines)."""

    def __init__(self, base: str) -> None:
        u = urlsplit(base)
        self.addr = (u.hostname or "127.0.0.1", u.port or 80)
        self.sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        s = socket.create_connection(self.addr, timeout=60)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def send(self, raw: bytes) -> tuple[int, float, float, int]:
        if self.sock is None:
            self.sock = self._connect()
        resp = _Response()
        parser = httptools.HttpResponseParser(resp)
        t0 = time.perf_counter()
        self.sock.sendall(raw)
        while not resp.done:
            data = self.sock.recv(262144)
            if not data:
                self.close()
                raise ConnectionError("closed before the answer ended")
            parser.feed_data(data)
        t1 = time.perf_counter()
        if not parser.should_keep_alive():
            self.close()
        return parser.get_status_code(), t1 - t0, (resp.first_event - t0) if resp.events else 0.0, resp.events

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def interleaved(
    targets: dict[str, tuple[str, bytes]], n: int, block: int = 50, pause: float = 0.0
) -> dict[str, dict[str, list[float] | int]]:
    """``n`` requests per target at concurrency 1, targets taking turns in blocks so that drift
    hits all alike, ``pause`` seconds before each request. ``targets``: name -> (base URL,
    request bytes). Per target: total and first-event seconds, ``data:`` lines per answer, and
    errors (non-200 or broken)."""
    out: dict[str, dict] = {k: {"total": [], "first": [], "events": [], "errors": 0, "error": ""} for k in targets}
    clients = {k: BlockingClient(base) for k, (base, _) in targets.items()}
    try:
        for _ in range(max(1, n // block)):
            for name, (_, raw) in targets.items():
                r, c = out[name], clients[name]
                for _ in range(block):
                    if pause:
                        time.sleep(pause)
                    try:
                        status, total, first, events = c.send(raw)
                    except OSError as e:
                        c.close()
                        r["errors"] += 1
                        r["error"] = repr(e)
                        continue
                    if status != 200:
                        r["errors"] += 1
                        r["error"] = f"HTTP {status}"
                        continue
                    r["total"].append(total)
                    r["first"].append(first)
                    r["events"].append(events)
    finally:
        for c in clients.values():
            c.close()
    return out


def wrk(base: str, payload: bytes, seconds: int, connections: int, cpu: int, tmp: Path) -> dict:
    """Max req/s of non-streaming POSTs on keep-alive connections (one wrk thread on ``cpu``).

    The duration is passed as whole seconds: wrk rejects ``-d8.0s`` with its usage text and
    exit status 1, which is how the old harness failed when ``--seconds`` came from the command
    line as a float. Non-2xx answers and socket errors are reported, not counted as served."""
    script = tmp / "post.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(payload.decode())}\n"  # a JSON string is a valid Lua string literal here
    )
    argv = ["taskset", "-c", str(cpu), "wrk", "-t1", f"-c{connections}", f"-d{max(1, int(seconds))}s"]
    argv += ["--timeout", "10s", "-s", str(script), base + "/v1/chat/completions"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    out = {"rps": 0.0, "requests": 0, "non_2xx": 0, "socket_errors": "", "wrk_exit": proc.returncode}
    for line in proc.stdout.splitlines():
        s = line.strip()
        if s.startswith("Requests/sec:"):
            out["rps"] = float(s.split()[1])
        elif "requests in" in s:
            out["requests"] = int(s.split()[0])
        elif s.startswith("Non-2xx or 3xx responses:"):
            out["non_2xx"] = int(s.split()[-1])
        elif s.startswith("Socket errors:"):
            out["socket_errors"] = s.removeprefix("Socket errors:").strip()
    if proc.returncode != 0 or not out["requests"]:
        out["error"] = (proc.stdout + proc.stderr).strip()[-500:]
    if out["non_2xx"] and out["requests"]:  # errors served fast are not throughput
        out["rps"] = round(out["rps"] * (1 - out["non_2xx"] / out["requests"]), 1)
    return out


# ---------------------------------------------------------------- many concurrent streams


class _Stream(asyncio.Protocol):
    def __init__(self, raw: bytes, rec: _Record) -> None:
        self.raw, self.rec = raw, rec
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.t0 = 0.0
        self.last = 0.0
        self.events = 0
        self.tail = b""
        self.finished = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.t0 = time.perf_counter()
        self.transport.write(self.raw)

    def data_received(self, data: bytes) -> None:
        self.now = time.perf_counter()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.rec.error(f"parse: {e}")
            self._end()

    def on_headers_complete(self) -> None:
        if self.parser.get_status_code() != 200:
            self.rec.error(f"HTTP {self.parser.get_status_code()}")

    def on_body(self, data: bytes) -> None:
        n = (self.tail + data).count(MARK)
        self.tail = data[-(len(MARK) - 1) :]
        if not n:
            return
        if self.events:
            self.rec.gaps.append(self.now - self.last)
            for _ in range(n - 1):
                self.rec.gaps.append(0.0)  # arrived in the same read as the previous one
        else:
            self.rec.first.append(self.now - self.t0)
        self.last = self.now
        self.events += n
        self.rec.events += n

    def on_message_complete(self) -> None:
        self.finished = True
        self.rec.completed += 1
        self._end()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            self.rec.error(f"closed early: {exc!r}" if exc else "closed early")
        self.rec.open -= 1
        self.rec.maybe_done()

    def _end(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Record:
    def __init__(self, streams: int) -> None:
        self.streams = streams
        self.open = 0
        self.started = 0
        self.events = 0
        self.completed = 0
        self.errors = 0
        self.error_kinds: dict[str, int] = {}
        self.gaps = array("d")
        self.first = array("d")
        self.all_done = asyncio.Event()

    def error(self, kind: str) -> None:
        self.errors += 1
        kind = kind[:120]
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    def maybe_done(self) -> None:
        if self.started == self.streams and self.open == 0:
            self.all_done.set()


async def _streams(base: str, raw: bytes, n: int, start_at: float, ramp: float, deadline: float) -> _Record:
    loop = asyncio.get_running_loop()
    u = urlsplit(base)
    rec = _Record(n)

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, start_at + ramp * i / max(1, n) - time.time()))
        rec.started += 1
        rec.open += 1
        try:
            transport, _ = await loop.create_connection(lambda: _Stream(raw, rec), u.hostname, u.port)
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            rec.error(f"connect: {e.strerror or e!r}")
            rec.open -= 1
            rec.maybe_done()

    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    try:
        await asyncio.wait_for(rec.all_done.wait(), max(1.0, deadline - time.time()))
    except TimeoutError:
        for _ in range(rec.open):  # one error per stream that never ended
            rec.error("deadline: stream still open")
    for t in tasks:
        t.cancel()
    return rec


def _client_proc(conn, base: str, raw: bytes, n: int, start_at: float, ramp: float, deadline: float) -> None:
    rec = uvloop.run(_streams(base, raw, n, start_at, ramp, deadline))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    conn.send(
        {
            "events": rec.events,
            "completed": rec.completed,
            "errors": rec.errors,
            "error_kinds": rec.error_kinds,
            "gaps": rec.gaps.tobytes(),
            "first": rec.first.tobytes(),
            "cpu_s": ru.ru_utime + ru.ru_stime,
        }
    )
    conn.close()


def streams(base: str, raw: bytes, n: int, procs: int, ramp: float, duration: float, sample) -> dict:
    """``n`` concurrent streams over ``procs`` client processes (they inherit this process's
    CPU affinity), opened evenly over ``ramp`` seconds; ``sample()`` is called about every
    0.25 s while they run (the caller reads the proxy's RSS). Returns counts, gaps and first
    event times (seconds) and the clients' CPU seconds."""
    ctx = multiprocessing.get_context("fork")
    start_at = time.time() + 0.5
    deadline = start_at + ramp + duration + max(20.0, duration)
    workers = []
    for k in range(procs):
        share = n // procs + (k < n % procs)
        a, b = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_client_proc, args=(b, base, raw, share, start_at + k * ramp / n, ramp, deadline))
        p.start()
        workers.append((p, a))
    results = []
    pending = list(workers)
    while pending:
        sample()
        still = []
        for p, a in pending:
            if a.poll(0.25 / len(pending)):
                results.append(a.recv())
                p.join()
            else:
                still.append((p, a))
        pending = still
    gaps, first = array("d"), array("d")
    out = {"events": 0, "completed": 0, "errors": 0, "error_kinds": {}, "client_cpu_s": 0.0}
    for r in results:
        out["events"] += r["events"]
        out["completed"] += r["completed"]
        out["errors"] += r["errors"]
        out["client_cpu_s"] += r["cpu_s"]
        for k, v in r["error_kinds"].items():
            out["error_kinds"][k] = out["error_kinds"].get(k, 0) + v
        gaps.frombytes(r["gaps"])
        first.frombytes(r["first"])
    out["gaps"], out["first"] = gaps, first
    return out
