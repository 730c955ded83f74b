#!/usr/bin/env python3
"""Backends for bench/proxy.py that are fast enough for the proxy in front to be the bottleneck.

Run as a vLLM-shaped launcher (the agent appends ``MODEL --host H --port P --served-model-name N
...``; unknown flags are ignored), or imported for ``nginx_canned_conf``:

- ``canned``: nginx (one process, ``master_process off``) answering every chat completion with one
  fixed JSON body, keep-alive, no access log; also /health, /v1/models, /metrics so the agent
  supervises it like a vLLM server. nginx rather than Python because wrk shares its core: a
  Python server there would cap every target at its own rate, as the simulated server does.
- ``sse``: a uvloop server on asyncio Protocols with httptools that streams ``max_tokens`` SSE
  events per chat completion at ``--events-per-second``, then ``data: [DONE]``; non-streaming
  requests get the canned body. One repeating timer drives every stream (streams are spread
  over ten phase buckets so writes do not come in one burst per interval), so 5,000 streams at
  20 events/s cost one write each per event and nothing else. The simulated vLLM server can
  stream at a fixed rate too (``tokens_per_second``), but at aiohttp's cost per event and behind
  its ``--max-num-seqs`` slots, which would make it the bottleneck of a 1,000-stream test.

The first event of a stream is written at once after the head, in its own write, as vLLM
writes its head and then each token: a proxy that holds headers back sees two writes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

import httptools
import msgspec
import uvloop

CANNED = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"m",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)


def models_body(name: str) -> bytes:
    return b'{"object":"list","data":[{"id":"%s","object":"model","owned_by":"bench"}]}' % name.encode()


def nginx_canned_conf(tmp: Path, port: int, model: str) -> str:
    """One nginx process on ``port`` answering like a vLLM server that returns one fixed answer."""
    body = CANNED.decode().replace("'", "\\'")
    models = models_body(model).decode()
    return f"""
master_process off;
worker_processes 1;
daemon off;
pid {tmp}/canned.pid;
error_log {tmp}/canned-error.log;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  default_type application/json;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = /health {{ return 200 ''; }}
    location = /v1/models {{ return 200 '{models}'; }}
    location = /metrics {{ default_type text/plain; return 200 ''; }}
    location / {{ return 200 '{body}'; }}
  }}
}}
"""


# ---------------------------------------------------------------- the SSE server


def chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk holding one SSE event."""
    event = b"data: " + payload + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


EVENT = chunk(
    b'{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"tok"},"finish_reason":null}]}'
)
FIRST = chunk(
    b'{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"m",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"tok"},"finish_reason":null}]}'
)
LAST = (
    chunk(
        b'{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"m",'
        b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
    )
    + chunk(b"[DONE]")
    + b"0\r\n\r\n"
)
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
BUCKETS = 10


class Streams:
    """Every open stream, in BUCKETS phase buckets; one timer per 1/BUCKETS of an interval
    writes the next event of each stream in the bucket due."""

    def __init__(self, loop: asyncio.AbstractEventLoop, events_per_second: float) -> None:
        self.loop = loop
        self.tick = 1 / events_per_second / BUCKETS
        self.buckets: list[set[Conn]] = [set() for _ in range(BUCKETS)]
        self.n = 0
        self.t0 = loop.time()
        loop.call_at(self.t0 + self.tick, self._fire)

    def add(self, conn: Conn) -> None:
        # the bucket that fires one whole interval from now
        self.buckets[self.n % BUCKETS].add(conn)

    def _fire(self) -> None:
        self.n += 1
        bucket = self.buckets[self.n % BUCKETS]
        done = [c for c in bucket if not c.next_event()]
        for c in done:
            bucket.discard(c)
        self.loop.call_at(self.t0 + (self.n + 1) * self.tick, self._fire)


class Conn(asyncio.Protocol):
    def __init__(self, streams: Streams, model: bytes) -> None:
        self.streams = streams
        self.models = models_body(model.decode())
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.left = 0  # events still to write on the open stream
        self.keep_alive = True
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.left = 0
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        url, body = self.url.split(b"?", 1)[0], b"".join(self.body)
        self.url, self.body = b"", []
        self.keep_alive = self.parser.should_keep_alive()
        if url.endswith(b"/completions") and self.parser.get_method() == b"POST":
            req = msgspec.json.decode(body) if body else {}
            if req.get("stream"):
                return self.start_stream(int(req.get("max_tokens") or 16))
            return self.answer(b"200 OK", b"application/json", CANNED)
        if url == b"/health":
            return self.answer(b"200 OK", b"text/plain", b"")
        if url.endswith(b"/models"):
            return self.answer(b"200 OK", b"application/json", self.models)
        if url == b"/metrics":
            return self.answer(b"200 OK", b"text/plain", b"")
        self.answer(b"404 Not Found", b"application/json", b'{"detail":"Not Found"}')

    def answer(self, status: bytes, ctype: bytes, body: bytes) -> None:
        assert self.transport is not None
        conn = b"" if self.keep_alive else b"Connection: close\r\n"
        self.transport.write(
            b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status, ctype, len(body), conn, body)
        )
        if not self.keep_alive:
            self.transport.close()

    def start_stream(self, events: int) -> None:
        assert self.transport is not None
        self.transport.write(SSE_HEAD)
        self.left = events
        self.streams.loop.call_soon(self._first)

    def _first(self) -> None:
        if self.transport is None:
            return
        self.left -= 1
        if self.left <= 0:
            self._finish(FIRST)
        else:
            self.transport.write(FIRST)
            self.streams.add(self)

    def next_event(self) -> bool:
        """Write the next event; False when the stream is over."""
        if self.transport is None or self.left <= 0:
            return False
        self.left -= 1
        if self.left == 0:
            self._finish(EVENT)
            return False
        self.transport.write(EVENT)
        return True

    def _finish(self, event: bytes) -> None:
        """The last content event, the finish chunk and [DONE] in one write, as vLLM's last
        writes come back to back: a stream of N tokens carries N + 2 ``data:`` lines."""
        assert self.transport is not None
        self.transport.write(event + LAST)
        if not self.keep_alive:
            self.transport.close()


async def serve_sse(host: str, port: int, model: str, events_per_second: float) -> None:
    loop = asyncio.get_running_loop()
    streams = Streams(loop, events_per_second)
    server = await loop.create_server(lambda: Conn(streams, model.encode()), host, port, backlog=8192)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["canned", "sse"])
    p.add_argument("model", nargs="?", default="m")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--served-model-name", nargs="+")
    p.add_argument("--events-per-second", type=float, default=20.0)
    p.add_argument("--tmp", type=Path, help="canned: nginx's config, pid and temp files (default: a new temp dir)")
    args, _ = p.parse_known_args()
    model = (args.served_model_name or [args.model])[0]
    if args.kind == "canned":
        tmp = args.tmp or Path(tempfile.mkdtemp(prefix="bench-canned-"))
        tmp.mkdir(parents=True, exist_ok=True)
        conf = tmp / "nginx.conf"
        conf.write_text(nginx_canned_conf(tmp, args.port, model))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        os.execv(nginx, [nginx, "-p", str(tmp), "-c", str(conf)])
    uvloop.run(serve_sse(args.host, args.port, model, args.events_per_second))


if __name__ == "__main__":
    sys.exit(main())
