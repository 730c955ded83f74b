"""The smallest Prometheus text-format reader we need: the sum of a metric's samples by name."""

from __future__ import annotations


def parse_samples(text: str, wanted: set[str]) -> dict[str, float]:
    """Sum the values of each wanted metric across its label sets; unparsable lines are skipped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        space = line.find(" ")
        if space < 0:
            continue
        if 0 <= brace < space:
            name = line[:brace]
            end = line.rfind("}")
            rest = line[end + 1 :].split()
        else:
            name = line[:space]
            rest = line[space + 1 :].split()
        if name not in wanted or not rest:
            continue
        try:
            out[name] = out.get(name, 0.0) + float(rest[0])
        except ValueError:
            continue
    return out
