#!/usr/bin/env python3
"""The agent's data path compiled with Cython, beside the same code interpreted: what compiling
it, unchanged, would save per request.

The proxy's CPU per request is spread over about 150 calls of our own small functions per
request (cProfile; bench/proxy_floor.py measures the same steps written flat at half the cost).
Compiling the modules those calls live in, as they are, makes each call and attribute access
cheaper without touching the code. This bench copies ``agent/``, ``gpufleet/`` and ``bench/``
to a temporary tree, compiles the data path's modules there with Cython (``cythonize -i``, in a
virtualenv of its own cached under ``~/.cache/gpufleet-bench``, as the peers are), and runs
bench/proxy_inproc.py alternately on this checkout and on the compiled copy: the same process
layout, the same moment, pairs in turn. ``--harness`` runs gpu-agent in bench/proxy.py's harness
instead (an agent process on its own core, wrk on the other; the copy first on PYTHONPATH): its
req/s and CPU per request, and c=1 added latency. The agent itself is not built this way
(docs/benchmarks.md, issue 18 step 8, says why).

    .venv/bin/python bench/proxy_compiled.py [--pairs 3] [--blocks 5] [--seconds 1.5] [--stream]
    .venv/bin/python bench/proxy_compiled.py --harness [--pairs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from proxy_targets import Unavailable, peer_venv

ROOT = Path(__file__).resolve().parent.parent
# The modules a proxied request runs through (bench/proxy_inproc.py's profile), compiled as they are.
MODULES = [
    "agent/proxy/front.py",
    "agent/proxy/frontrequest.py",
    "agent/proxy/frontanswer.py",
    "agent/proxy/frontphases.py",
    "agent/proxy/server.py",
    "agent/proxy/fastlane.py",
    "agent/proxy/dispatch.py",
    "agent/proxy/relay.py",
    "agent/proxy/httpclient.py",
    "agent/proxy/context.py",
    "agent/proxy/exchange.py",
    "agent/proxy/surface.py",
    "agent/proxy/routing.py",
    "agent/proxy/stats.py",
    "agent/proxy/upstreams.py",
    "agent/proxy/accesslog.py",
    "agent/proxy/metrics.py",
    "agent/keys/gate.py",
    "gpufleet/deadlines.py",
    "gpufleet/outbox.py",
    "gpufleet/httpserver.py",
]


def compiled_tree(where: Path) -> tuple[Path, str]:
    """A copy of the packages with MODULES compiled in place; (its root, Cython's version)."""
    venv, version = peer_venv("cython")
    tree = where / "tree"
    for package in ("agent", "gpufleet", "bench"):
        shutil.copytree(ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
    # annotation_typing=False: annotations stay documentation, as in CPython (Cython would
    # otherwise check or convert arguments annotated int, float, list...).
    argv = [str(venv / "bin" / "cythonize"), "-i", "-q", "-3", "-j", str(os.cpu_count() or 1)]
    argv += ["-X", "annotation_typing=False", *MODULES]
    done = subprocess.run(argv, cwd=tree, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"cythonize failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return tree, version


def inproc(cwd: Path, args: argparse.Namespace) -> dict[str, object]:
    argv = [sys.executable, "bench/proxy_inproc.py", "--blocks", str(args.blocks), "--seconds", str(args.seconds)]
    if args.stream:
        argv.append("--stream")
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(done.stdout.strip().splitlines()[-1])


def harness(cwd: Path) -> dict[str, object]:
    """gpu-agent alone in bench/proxy.py's harness, run from ``cwd`` (its packages first)."""
    argv = [sys.executable, "bench/proxy.py", "--targets", "direct,gpu-agent", "--requests", "300", "--seconds", "6"]
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    done = subprocess.run([*argv, "--streams", ""], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"bench/proxy.py failed:\n{done.stderr[-3000:]}")
    doc = json.loads(done.stdout)
    rps, c1 = doc["max_rps"]["gpu-agent"], doc["latency_c1"]
    return {
        "rps": rps["rps"],
        "cpu_us_per_request": rps["cpu_us_per_request"],
        "c1_added_p50_ms": {backend: c1[backend]["gpu-agent"]["added_p50_ms"] for backend in c1},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--stream", action="store_true", help="SSE answers (4 events) instead of JSON")
    ap.add_argument("--harness", action="store_true", help="gpu-agent in bench/proxy.py's harness, not in one process")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="proxy-compiled-") as d:
        try:
            tree, version = compiled_tree(Path(d))
        except Unavailable as e:
            raise SystemExit(str(e)) from None
        runs: dict[str, list[dict[str, object]]] = {"interpreted": [], "compiled": []}
        if args.harness:
            for _ in range(args.pairs):
                for name, cwd in (("interpreted", ROOT), ("compiled", tree)):
                    runs[name].append(harness(cwd))
            print(json.dumps({"cython": version, "modules": MODULES, **runs}, indent=1))
            return
        for _ in range(args.pairs):
            for name, cwd in (("interpreted", ROOT), ("compiled", tree)):
                result = inproc(cwd, args)
                if result["compiled"] != (name == "compiled"):
                    raise SystemExit(f"the {name} run loaded the other build of the data path")
                runs[name].append(result)

    def median(name: str, field: str) -> float:
        return round(statistics.median(float(r[field]) for r in runs[name]), 2)  # type: ignore[arg-type]

    summary = {
        "cython": version,
        "modules": MODULES,
        "stream": args.stream,
        **{
            name: {
                "proxy_us_per_request": [r["proxy_us_per_request"] for r in runs[name]],
                "proxy_cost_in_direct_requests": [r["proxy_cost_in_direct_requests"] for r in runs[name]],
                "median_cost_in_direct_requests": median(name, "proxy_cost_in_direct_requests"),
            }
            for name in runs
        },
    }
    summary["compiled_over_interpreted"] = round(
        median("compiled", "proxy_cost_in_direct_requests") / median("interpreted", "proxy_cost_in_direct_requests"), 3
    )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
