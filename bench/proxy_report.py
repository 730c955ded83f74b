#!/usr/bin/env python3
"""bench/proxy.py's JSON as the markdown table docs/benchmarks.md records:

.venv/bin/python bench/proxy.py > proxy.json && .venv/bin/python bench/proxy_report.py proxy.json
"""

from __future__ import annotations

import json
import sys

ORDER = ("direct", "gpu-agent", "floor", "nginx", "vllm-router", "litellm")
NA = "n/a"  # a target that does not run the test (the floor relay relays no streams)


def fmt(v, unit: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        v = f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"
    elif isinstance(v, int):
        v = f"{v:,}"
    return f"{v}{unit}"


def per_target(section: dict, names: list[str], show) -> list[str]:
    """One cell per target: ``show`` of its row in ``section``, or n/a where it did not run."""
    return [show(section[n], n) if n in section else NA for n in names]


def shares(rates: dict, of: str) -> str:
    """``of``'s rate as a share of vllm-router's and nginx's."""
    a = rates.get(of)
    return ", ".join(f"{a / rates[p]:.2f}× {p}" if a and rates.get(p) else f"— × {p}" for p in ("vllm-router", "nginx"))


def table(r: dict) -> str:
    names = [n for n in ORDER if n in r["max_rps"]]
    goals = {g["goal"]: g for g in r.get("goals", [])}

    def verdict(prefix: str) -> str:
        hits = [g for k, g in goals.items() if k.startswith(prefix)]
        if not hits:
            return ""
        return " / ".join("—" if g["met"] is None else ("met" if g["met"] else "**not met**") for g in hits)

    rows: list[tuple[str, list[str], str, str]] = []
    rps = r["max_rps"]
    rows.append(("max req/s, canned backend (wrk, keep-alive)", [fmt(rps[n].get("rps")) for n in names], "", ""))
    rates = {n: rps[n].get("rps") for n in names}
    rows.append(
        ("req/s as a share of", ["" for _ in names], "gpu-agent: ≥ 2× vllm-router, ≥ 0.4× nginx", verdict("req/s"))
    )
    for n in ("gpu-agent", "floor"):
        if n in names:
            rows[-1][1][names.index(n)] = shares(rates, n)
    rows.append(("proxy CPU per request", [fmt(rps[n].get("cpu_us_per_request"), " µs") for n in names], "", ""))
    per_core = {n: 1e6 / rps[n]["cpu_us_per_request"] for n in names if rps[n].get("cpu_us_per_request")}
    rows.append(("req/s one core could serve (1 / CPU per request)", [fmt(per_core.get(n)) for n in names], "", ""))
    rows.append(("CPU-derived req/s as a share of", ["" for _ in names], "", ""))
    for n in ("gpu-agent", "floor"):
        if n in names:
            rows[-1][1][names.index(n)] = shares(per_core, n)
    for b, label in (("sim", "simulated vLLM"), ("canned", "canned")):
        lat = r["latency_c1"][b]
        rows.append(
            (
                f"c=1 p50 / p99, {label} backend",
                per_target(lat, names, lambda x, _: f"{fmt(x.get('p50_ms'))} / {fmt(x.get('p99_ms'))} ms"),
                "",
                "",
            )
        )
        rows.append(
            (
                f"c=1 **added** p50 / p99, {label} backend",
                per_target(
                    lat,
                    names,
                    lambda x, n: (
                        "—" if n == "direct" else f"{fmt(x.get('added_p50_ms'))} / {fmt(x.get('added_p99_ms'))} ms"
                    ),
                ),
                "p50 within 0.1 ms of nginx's",
                verdict(f"c=1 added p50 within 0.1 ms of nginx's ({b}"),
            )
        )
    sse = r["sse_first_event"]
    rows.append(
        (
            "SSE first event p50 / p99 (overhead)",
            per_target(
                sse,
                names,
                lambda x, n: (
                    f"{fmt(x.get('first_event_p50_ms'))} / {fmt(x.get('first_event_p99_ms'))} ms"
                    + (
                        ""
                        if n == "direct"
                        else f" (+{fmt(x.get('overhead_p50_ms'))} / +{fmt(x.get('overhead_p99_ms'))})"
                    )
                ),
            ),
            "overhead p50 ≤ 0.5 ms",
            verdict("SSE first-event"),
        )
    )
    idle = r.get("sse_first_event_after_1s_idle")
    if idle:
        rows.append(
            (
                f"SSE first event after 1 s idle, p50 (overhead), n={idle['direct']['n']}",
                per_target(
                    idle,
                    names,
                    lambda x, n: (
                        f"{fmt(x.get('first_event_p50_ms'))} ms"
                        + ("" if n == "direct" else f" (+{fmt(x.get('overhead_p50_ms'))})")
                    ),
                ),
                "",
                "",
            )
        )
    for i, key in enumerate(k for k in r if k.startswith("streams_")):
        s = r[key]
        n_streams = int(key.split("_")[1])
        rate = next(iter(s.values()))["events_per_second_each"]
        head = f"{n_streams:,} streams × {rate:g} events/s"
        rows.append(
            (
                f"{head}: events delivered",
                per_target(
                    s,
                    names,
                    lambda x, _: (
                        f"{fmt(x['events'])} / {fmt(x['events_expected'])}" + ("" if x["all_delivered"] else " ✘")
                    ),
                ),
                "all" if i == 0 else "all (sustained)",
                verdict(f"{n_streams:,} streams: every") if i == 0 else verdict(f"{n_streams:,} streams on one core"),
            )
        )
        rows.append(
            (
                f"{head}: inter-event gap p99 (added)",
                per_target(
                    s,
                    names,
                    lambda x, n: (
                        f"{fmt(x.get('gap_p99_ms'))} ms"
                        + ("" if n == "direct" else f" ({fmt(x.get('added_gap_p99_ms'))})")
                    ),
                ),
                "added ≤ 10 ms" if i == 0 else "",
                verdict(f"{n_streams:,} streams: added") if i == 0 else "",
            )
        )
        rows.append(
            (
                f"{head}: events that came in one read with the one before",
                per_target(s, names, lambda x, _: f"{x.get('gaps_zero_share', 0):.1%}"),
                "",
                "",
            )
        )
        rows.append(
            (
                f"{head}: first event p99",
                per_target(s, names, lambda x, _: f"{fmt(x.get('first_event_p99_ms'))} ms"),
                "",
                "",
            )
        )
        rows.append(
            (
                f"{head}: listen-queue overflows",
                per_target(s, names, lambda x, _: fmt(x["listen_overflows"])),
                "0" if i == 0 else "",
                verdict(f"{n_streams:,} streams: no listen") if i == 0 else "",
            )
        )
        rows.append(
            (
                f"{head}: RSS per open stream",
                per_target(s, names, lambda x, _: fmt(x.get("rss_kb_per_stream"), " KB")),
                "≤ 16 KB" if i == 0 else "",
                verdict(f"{n_streams:,} streams: <= 16") if i == 0 else "",
            )
        )
        rows.append(
            (
                f"{head}: proxy CPU per event; load core busy",
                per_target(
                    s, names, lambda x, _: f"{fmt(x.get('cpu_us_per_event'), ' µs')}; {x['load_core_busy']:.0%}"
                ),
                "",
                "",
            )
        )
        errs = per_target(s, names, lambda x, _: fmt(x["errors"]))
        if any(e not in ("0", NA) for e in errs):
            rows.append((f"{head}: client-side errors", errs, "", ""))
    out = ["| | " + " | ".join(names) + " | goal (gpu-agent) | gpu-agent |", "|---" * (len(names) + 3) + "|"]
    for label, cells, goal, met in rows:
        out.append(f"| {label} | " + " | ".join(cells) + f" | {goal} | {met} |")
    for n, why in r.get("unavailable", {}).items():
        out.append(f"\n{n}: unavailable — {why.strip().splitlines()[-1] if why.strip() else why}")
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(table(json.load(f)))
