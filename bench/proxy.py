#!/usr/bin/env python3
"""Proxy overhead: one simulated vLLM backend reached directly, through gpu-agent, through nginx.

All three paths hit the *same* backend process (the agent's own supervised instance), in the
same run, interleaved in blocks so drift hits them alike. nginx is configured as a streaming
LLM gateway should be: HTTP/1.1 upstream with keep-alive, ``proxy_buffering off``.

Measured:
- added latency p50/p99 of a non-streaming chat completion (1 token) at concurrency 1 and 64;
- SSE: time to first chunk, inter-chunk gaps and whether every chunk arrives on its own;
- max req/s with each proxy pinned to one core (wrk; backend and wrk share the other core).

Setup (Debian): apt-get install -y nginx-light wrk. Run:

    .venv/bin/python bench/proxy.py [--requests 2000] [--seconds 8]

Prints one JSON document; docs/benchmarks.md records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import aiohttp
from _common import free_port, pct

from gpufleet import tomlwrite
from gpufleet_dev.localfleet import AgentProcess, FleetError

BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1}


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of a process (os.sched_setaffinity alone moves only one thread)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except OSError:
            pass


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def start_agent(tmp: Path) -> tuple[AgentProcess, int, int]:
    """An agent of the local-fleet harness proxying to one simulated server: (agent, its port,
    the server's port) once the server is READY."""
    port = free_port()
    instance = {
        "name": "backend",
        "backend": "vllm",
        "launcher": ["{python}", "-m", "gpufleet_dev.simulated_server", "serve"],
        "model": "m",
        "args": ["--tokens-per-second", "0", "--disable-uvicorn-access-log"],
    }
    doc = {
        "agent": {"listen_port": port, "state_dir": tmp / "state", "log_dir": tmp / "logs", "log_format": "json"},
        "gpu": {"source": "simulated", "simulated": [{"name": "NVIDIA A100-SXM4-80GB"}]},
        "supervisor": {"port_base": free_port(), "port_span": 1},
        "instances": [instance],
    }
    agent = AgentProcess(tmp, tomlwrite.dumps(doc), port).start()
    try:
        agent.wait_ready_sync(1, timeout=60)
    except FleetError as e:
        agent.stop()
        raise SystemExit(f"agent not ready: {e}") from None
    return agent, port, agent.status_sync()["instances"][0]["port"]


def start_nginx(tmp: Path, backend_port: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log {tmp}/nginx-access.log;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  client_max_body_size 32m;
  upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
""")
    proc = subprocess.Popen(
        [shutil.which("nginx") or "nginx", "-p", str(tmp), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("nginx did not start")


async def latency(targets: dict[str, str], n: int, concurrency: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in targets}
    payload = json.dumps(BODY).encode()
    headers = {"Content-Type": "application/json"}
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as http:

        async def one(url: str, sink: list[float]) -> None:
            t0 = time.perf_counter()
            async with http.post(url, data=payload, headers=headers) as r:
                await r.read()
                assert r.status == 200, r.status
            sink.append(time.perf_counter() - t0)

        block = 100
        for _ in range(max(1, n // block)):  # interleave targets in blocks: drift hits all alike
            for name, base in targets.items():
                url = base + "/v1/chat/completions"
                if concurrency == 1:
                    for _ in range(block):
                        await one(url, out[name])
                else:
                    sem = asyncio.Semaphore(concurrency)

                    async def bounded(url: str = url, name: str = name, sem: asyncio.Semaphore = sem) -> None:
                        async with sem:
                            await one(url, out[name])

                    await asyncio.gather(*(bounded() for _ in range(block * 4)))
    return out


async def sse(targets: dict[str, str], rounds: int, tokens: int) -> dict[str, dict]:
    body = json.dumps({**BODY, "max_tokens": tokens, "stream": True}).encode()
    res: dict[str, dict] = {k: {"ttfb": [], "gaps": [], "events": 0, "merged_reads": 0, "reads": 0} for k in targets}
    async with aiohttp.ClientSession() as http:
        for _ in range(rounds):
            for name, base in targets.items():
                r_ = res[name]
                t0 = time.perf_counter()
                last = None
                async with http.post(
                    base + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
                ) as r:
                    async for chunk in r.content.iter_any():
                        now = time.perf_counter()
                        if last is None:
                            r_["ttfb"].append(now - t0)
                        else:
                            r_["gaps"].append(now - last)
                        last = now
                        n = chunk.count(b"\n\n")
                        r_["events"] += n
                        r_["reads"] += 1
                        r_["merged_reads"] += n > 1
    return res


def wrk(url: str, seconds: float, tmp: Path) -> float:
    script = tmp / "post.lua"
    script.write_text(
        f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = \'{json.dumps(BODY)}\'\n'
    )
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", "-c64", f"-d{seconds}s", "-s", str(script), url + "/v1/chat/completions"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    raise RuntimeError(out)


def ms(x: float) -> float:
    return round(x * 1000, 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--sse-rounds", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        agent, agent_port, backend_port = start_agent(tmp)
        backend_pid = get_json(f"http://127.0.0.1:{agent_port}/v1/status")["instances"][0]["pid"]
        nginx, nginx_port = start_nginx(tmp, backend_port)
        try:
            pin(agent.pid, 0)
            for p in subprocess.run(["pgrep", "-f", f"nginx.*{tmp}"], capture_output=True, text=True).stdout.split():
                pin(int(p), 0)
            pin(backend_pid, 1)
            targets = {
                "direct": f"http://127.0.0.1:{backend_port}",
                "gpu_agent": f"http://127.0.0.1:{agent_port}",
                "nginx": f"http://127.0.0.1:{nginx_port}",
            }
            asyncio.run(latency(targets, 200, 1))  # warm connections and caches
            result: dict = {"benchmark": "proxy", "requests_per_target": args.requests, "latency_ms": {}}
            for c in (1, 64):
                lat = asyncio.run(latency(targets, args.requests if c == 1 else args.requests // 4, c))
                base50, base99 = pct(lat["direct"], 50), pct(lat["direct"], 99)
                result["latency_ms"][f"c{c}"] = {
                    name: {
                        "p50": ms(pct(v, 50)),
                        "p99": ms(pct(v, 99)),
                        "added_p50": ms(pct(v, 50) - base50),
                        "added_p99": ms(pct(v, 99) - base99),
                    }
                    for name, v in lat.items()
                }
            urllib.request.urlopen(
                urllib.request.Request(  # 50 tokens/s for the SSE phase
                    targets["direct"] + "/sim/control",
                    data=b'{"tokens_per_second": 50}',
                    method="POST",
                    headers={"Content-Type": "application/json"},
                ),
                timeout=5,
            ).read()
            tokens = 20
            s = asyncio.run(sse(targets, args.sse_rounds, tokens))
            base_ttfb = statistics.median(s["direct"]["ttfb"])
            base_gap = statistics.median(s["direct"]["gaps"])
            expected = args.sse_rounds * (tokens + 3)  # role chunk + tokens + finish chunk + [DONE]
            # The backend writes its finish chunk and [DONE] back to back, so some reads carry two
            # events even directly; "preserved" means no proxy merges more than the backend does.
            direct_merged = s["direct"]["merged_reads"]
            result["sse"] = {
                name: {
                    "ttfb_p50_ms": ms(statistics.median(v["ttfb"])),
                    "ttfb_overhead_p50_ms": ms(statistics.median(v["ttfb"]) - base_ttfb),
                    "gap_p50_ms": ms(statistics.median(v["gaps"])),
                    "gap_delta_p50_ms": ms(statistics.median(v["gaps"]) - base_gap),
                    "events": v["events"],
                    "events_expected": expected,
                    "reads": v["reads"],
                    "reads_with_several_events": v["merged_reads"],
                    "chunks_preserved": v["events"] == expected and v["merged_reads"] <= direct_merged,
                }
                for name, v in s.items()
            }
            urllib.request.urlopen(
                urllib.request.Request(
                    targets["direct"] + "/sim/control",
                    data=b'{"tokens_per_second": 0}',
                    method="POST",
                    headers={"Content-Type": "application/json"},
                ),
                timeout=5,
            ).read()
            rps = {name: round(wrk(url, args.seconds, tmp), 1) for name, url in targets.items()}
            ratio = round(rps["gpu_agent"] / rps["nginx"], 3)
            result["max_rps_proxy_on_one_core"] = {**rps, "gpu_agent_vs_nginx": ratio}
            result["note"] = (
                "proxies pinned to CPU 0; backend and wrk share CPU 1, so 'direct' and nginx are "
                "bounded by the Python backend, not by nginx"
            )
            print(json.dumps(result, indent=2))
        finally:
            nginx.send_signal(signal.SIGQUIT)
            agent.terminate()
            nginx.wait(10)
            agent.stop(60)


if __name__ == "__main__":
    main()
