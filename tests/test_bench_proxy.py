"""bench/proxy.py's own parts, cheaply: the SSE backend streams what it is asked for, the clients
count every event, and wrk gets a duration it accepts. No timing is asserted."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import free_port

from gpufleet_dev.fleetbase import wait_for

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import proxy_load as load  # noqa: E402


def _open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def sse() -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, str(BENCH / "proxy_backends.py"), "sse", "m", "--port", str(port)]
    proc = subprocess.Popen([*argv, "--events-per-second", "50"])
    try:
        wait_for(lambda: _open(port), 20, "SSE backend listening")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_backend_answers_and_streams(sse: str) -> None:
    c = load.BlockingClient(sse)
    try:
        status, _, _, events = c.send(load.request(sse, load.body("m")))
        assert (status, events) == (200, 0)
        # 3 tokens: 3 events, the finish event and [DONE], on the same keep-alive connection
        status, _, first, events = c.send(load.request(sse, load.body("m", stream=True, max_tokens=3)))
        assert (status, events) == (200, 5) and first > 0
    finally:
        c.close()


def test_stream_client_counts_every_event(sse: str) -> None:
    raw = load.request(sse, load.body("m", stream=True, max_tokens=4))
    r = load.streams(sse, raw, 20, 2, 0.2, 0.1, lambda: None)
    assert (r["completed"], r["errors"], r["events"]) == (20, 0, 20 * 6)
    assert len(r["first"]) == 20 and len(r["gaps"]) == 20 * 5


@pytest.mark.skipif(not shutil.which("wrk"), reason="wrk not installed")
def test_wrk_gets_whole_seconds(sse: str, tmp_path: Path) -> None:
    r = load.wrk(sse, load.body("m"), 1.0, 4, 0, tmp_path)  # a float: wrk rejected "-d1.0s"
    assert r["wrk_exit"] == 0 and r["requests"] > 0 and r["non_2xx"] == 0, r


@pytest.mark.parametrize("stream", [False, True])
def test_the_in_process_proxy_benchmark_runs(stream: bool) -> None:
    """bench/proxy_inproc.py end to end, briefly: every answer a 200 (it exits otherwise), one
    access-log line per proxied request, a cost per request reported."""
    import json

    argv = [sys.executable, str(BENCH / "proxy_inproc.py"), "--clients", "4", "--seconds", "0.2", "--blocks", "1"]
    out = subprocess.run([*argv, *(["--stream"] if stream else [])], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["stream"] is stream and result["req_per_s_through_proxy"] > 0
    assert result["proxy_us_per_request"] > 0 and result["log_lines"] > 0


def test_the_flat_relay_ladder_runs() -> None:
    """bench/proxy_floor.py end to end, briefly: every level relays (the clients exit on any
    answer but a 200) and reports its cost."""
    import json

    argv = [sys.executable, str(BENCH / "proxy_floor.py"), "--clients", "4", "--seconds", "0.1", "--blocks", "1"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["level"] for r in results] == list(range(11))
    assert all(r["direct_us_per_request"] > 0 for r in results)


def test_the_flat_relay_serves_whole_answers(sse: str) -> None:
    """``proxy_floor.py serve`` (bench/proxy.py's ``floor`` target) relays whole answers at its
    last level, on kept-alive connections; its pool starts empty, so the first requests of two
    clients open upstream connections and the later ones reuse them."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(BENCH / "proxy_floor.py"), "serve", f"{port}={sse}"])
    try:
        wait_for(lambda: _open(port), 20, "the floor relay listening")
        url = f"http://127.0.0.1:{port}"
        clients = [load.BlockingClient(url) for _ in range(2)]
        try:
            for _ in range(3):
                for c in clients:
                    status, _, _, events = c.send(load.request(url, load.body("m")))
                    assert (status, events) == (200, 0)
        finally:
            for c in clients:
                c.close()
        assert proc.poll() is None  # no request made it fail
    finally:
        proc.terminate()
        proc.wait(10)


def test_directions_time_each_protocols_data_received_and_keep_what_it_does() -> None:
    """bench/_common.Directions wraps a protocol class's ``data_received``: each call still does
    what it did (and raises what it raised), and is counted under its side's name."""
    import _common

    class Side:
        def __init__(self) -> None:
            self.got: list[bytes] = []

        def data_received(self, data: bytes) -> None:
            if data == b"bad":
                raise ValueError(data)
            self.got.append(data)

    directions = _common.Directions(client=Side)
    side = Side()
    side.data_received(b"one")
    side.data_received(b"two")
    with pytest.raises(ValueError):
        side.data_received(b"bad")
    assert side.got == [b"one", b"two"]
    assert directions.calls == {"client": 3}
    assert set(directions.report()) == {"client"} and directions.report()["client"] >= 0


@pytest.mark.parametrize("gaps", ["0", "5,-1", "abc", "nan"])
def test_idle_gaps_that_are_not_waits_are_refused_before_anything_starts(gaps: str) -> None:
    r = subprocess.run(
        [sys.executable, str(BENCH / "proxy.py"), "--latency-only", "--idle-gaps", gaps],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert "--idle-gaps" in r.stderr and "Traceback" not in r.stderr
