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
from agent.proxy.accesslog import BATCH_LINES, AccessLog
from gpufleet.logsetup import JsonSink, LineWriter


class CountingWriter(LineWriter):
    def __init__(self, fd: int) -> None:
        super().__init__(fd, lambda method, fields: json.dumps(fields), journal_socket="/nonexistent")
        self.writes = 0

    def _write_all(self, data: bytes) -> None:
        self.writes += 1
        super()._write_all(data)


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
        log.record(request_id=f"r{i}", status=200, model="m", path=Path("/v1/x"))
    await asyncio.sleep(0)  # the turn ends: nothing is written yet
    log.record(request_id="r5", status=429)  # another turn, the same batch
    assert writer.writes == 0
    await wait_until(lambda: writer.writes == 1, timeout=5, what="the batch written after FLUSH_S")
    lines = path.read_bytes().splitlines()
    assert len(lines) == 6 and all(line.startswith(b"<6>{") for line in lines)
    docs = [json.loads(line[3:]) for line in lines]
    assert [d["request_id"] for d in docs] == [f"r{i}" for i in range(6)]
    assert docs[0]["event"] == "request" and docs[0]["level"] == "info" and docs[0]["path"] == "/v1/x"
    assert len({d["timestamp"] for d in docs[:5]}) == 1 and docs[0]["timestamp"].endswith("Z")
    # A full batch goes out at once, without waiting for the timer.
    for i in range(BATCH_LINES):
        log.record(request_id=f"b{i}")
    assert writer.writes == 2 and len(path.read_bytes().splitlines()) == 6 + BATCH_LINES
    log.flush()  # nothing pending: no write
    assert writer.writes == 2


async def test_lines_a_full_disk_drops_are_counted(sink) -> None:  # type: ignore[no-untyped-def]
    writer, _ = sink
    os.close(writer.fd)
    writer.fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    log = AccessLog()
    for i in range(3):
        log.record(request_id=f"r{i}")
    log.flush()
    assert writer.dropped_lines == 3


async def test_without_json_logs_lines_go_through_structlog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logsetup, "_json_sink", None)
    seen = []

    class Logger:
        def info(self, event: str, **fields: object) -> None:
            seen.append((event, fields))

    monkeypatch.setattr("agent.proxy.accesslog.access", Logger())
    AccessLog().record(request_id="x", status=200)
    assert seen == [("request", {"request_id": "x", "status": 200})]
