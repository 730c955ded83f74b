"""The proxy's access log (agent/proxy/accesslog.py): lines go out in batches, one write each,
stamped once per event-loop turn; they look like structlog's, and are counted when a full disk
drops them."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from helpers import wait_until

import gpufleet.logsetup as logsetup
from agent.proxy.accesslog import BATCH_LINES, AccessEntry, AccessLog
from gpufleet.logsetup import JsonSink, LineWriter


class CountingWriter(LineWriter):
    def __init__(self, fd: int) -> None:
        super().__init__(fd, lambda method, fields: json.dumps(fields), journal_socket="/nonexistent")
        self.writes = 0

    def _write_all(self, data: bytes) -> None:
        self.writes += 1
        super()._write_all(data)


def line(rid: str, status: int = 200, **optional: object) -> AccessEntry:
    return AccessEntry(rid, "POST", "/v1/x", "m", "i0", status, False, None, 0.0015, 0, **optional)  # type: ignore[arg-type]


@pytest.fixture
def sink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT)
    writer = CountingWriter(fd)
    monkeypatch.setattr(logsetup, "_json_sink", JsonSink(writer, b"<6>", logsetup._encoder.encode))
    yield writer, tmp_path / "log"
    os.close(fd)


async def test_batches_one_write_each_with_one_timestamp_per_turn(sink) -> None:  # type: ignore[no-untyped-def]
    writer, path = sink
    log = AccessLog()
    for i in range(5):
        log.write(line(f"r{i}", key="team-a") if i == 1 else line(f"r{i}"))
    await asyncio.sleep(0)  # the turn ends: nothing is written yet
    log.write(line("r5", 429, stream_error=True, degraded="cache"))  # another turn, the same batch
    assert writer.writes == 0
    await wait_until(lambda: writer.writes == 1, timeout=5, what="the batch written after FLUSH_S")
    lines = path.read_bytes().splitlines()
    assert len(lines) == 6 and all(line.startswith(b"<6>{") for line in lines)
    docs = [json.loads(line[3:]) for line in lines]
    assert [d["request_id"] for d in docs] == [f"r{i}" for i in range(6)]
    assert list(docs[0]) == [
        "event", "request_id", "method", "path", "model", "instance", "status", "stream", "ttfb_ms",
        "duration_ms", "retries", "level", "timestamp",
    ]  # fmt: skip
    assert docs[0]["event"] == "request" and docs[0]["level"] == "info" and docs[0]["ttfb_ms"] is None
    # What applies only to some requests is written only for them.
    assert docs[1]["key"] == "team-a" and "stream_error" not in docs[1] and "degraded" not in docs[1]
    assert docs[5]["stream_error"] is True and docs[5]["degraded"] == "cache" and docs[5]["status"] == 429
    assert len({d["timestamp"] for d in docs[:5]}) == 1 and docs[0]["timestamp"].endswith("Z")
    # A full batch goes out at once, without waiting for the timer.
    for i in range(BATCH_LINES):
        log.write(line(f"b{i}"))
    assert writer.writes == 2 and len(path.read_bytes().splitlines()) == 6 + BATCH_LINES
    log.flush()  # nothing pending: no write
    assert writer.writes == 2
    # A line after a full batch in the same turn is stamped as the batch's lines were.
    log.write(line("after"))
    log.flush()
    docs = [json.loads(line[3:]) for line in path.read_bytes().splitlines()]
    assert docs[-1]["request_id"] == "after" and docs[-1]["timestamp"] == docs[-2]["timestamp"]


async def test_lines_a_full_disk_drops_are_counted(sink) -> None:  # type: ignore[no-untyped-def]
    writer, _ = sink
    os.close(writer.fd)
    writer.fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    log = AccessLog()
    for i in range(3):
        log.write(line(f"r{i}"))
    log.flush()
    assert writer.dropped_lines == 3


async def test_without_json_logs_lines_go_through_structlog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logsetup, "_json_sink", None)
    seen = []

    class Logger:
        def info(self, event: str, **fields: object) -> None:
            seen.append((event, fields))

    monkeypatch.setattr("agent.proxy.accesslog.access", Logger())
    AccessLog().write(line("x", key="team-a"))
    fields = {"request_id": "x", "method": "POST", "path": "/v1/x", "model": "m", "instance": "i0", "status": 200}
    fields |= {"stream": False, "ttfb_ms": None, "duration_ms": 1.5, "retries": 0, "key": "team-a"}
    assert seen == [("request", fields)]
