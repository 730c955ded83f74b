"""The GPU classes gpufleet knows: how to recognise each from its NVML name, and its base weight.

One table, read by the agent (name -> class, agent/gpu/) and by the coordinator
(class -> base weight, coordinator/policy/weights.py), so a GPU added here is both recognised
and weighted.

**The measure behind the weights.** Serving an LLM is bound by memory bandwidth while it
decodes (every generated token reads the weights and the KV cache once), so the base weight is
derived from each card's memory bandwidth (vendor spec sheets, the class's common variant):

    base = round(100 × (bandwidth / 600 GB/s) ** 0.73, -1)

600 GB/s is the A10, whose base is 100 in the gateway article the weights come from
(docs/sources.md, Clawdbot). The exponent is the least-squares fit, in log space, of that
article's two other anchors (A100 = 220, H100 = 380: throughput grows more slowly than
bandwidth, since batching makes decode partly compute-bound). The article's three classes keep
its measured numbers exactly (the design promises them); for them the formula
gives 240 and 350, within 9 %. A class the table does not know is UNKNOWN: the agent logs it
once, ``gpuctl check`` warns about it, and the coordinator weights it ``default_base`` (100)
and says so once — it is never silently taken for an A10.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UNKNOWN = "UNKNOWN"
A10_BANDWIDTH_GBS = 600.0
EXPONENT = 0.73


@dataclass(frozen=True)
class GpuClass:
    name: str
    pattern: str  # regex over the normalised NVML name (uppercase, single spaces)
    bandwidth_gbs: float  # memory bandwidth of the class's common variant, GB/s
    article_base: int | None = None  # the article's measured number, where it gives one

    @property
    def base_weight(self) -> int:
        if self.article_base is not None:
            return self.article_base
        return int(round(100 * (self.bandwidth_gbs / A10_BANDWIDTH_GBS) ** EXPONENT, -1))


# Order matters only for readability: every model number is anchored with \b on both sides, so
# "A10" cannot match inside "A100" or "A10G", "L40" not "L40S", "H200" not "GH200" (G and H are
# both word characters: no boundary between them).
CLASSES: tuple[GpuClass, ...] = (
    GpuClass("GB200", r"\bGB200\b", 8000),
    GpuClass("B200", r"\bB200\b", 8000),
    GpuClass("B100", r"\bB100\b", 8000),
    GpuClass("GH200", r"\bGH200\b", 4000),
    GpuClass("H200", r"\bH200\b", 4800),
    GpuClass("H100", r"\bH100\b", 3350, article_base=380),
    GpuClass("H800", r"\bH800\b", 3350, article_base=380),  # H100 with less NVLink (China)
    GpuClass("H20", r"\bH20\b", 4000),
    GpuClass("A100", r"\bA100\b", 2039, article_base=220),
    GpuClass("A800", r"\bA800\b", 2039, article_base=220),  # A100 with less NVLink (China)
    GpuClass("A10G", r"\bA10G\b", 600),
    GpuClass("A10", r"\bA10\b", 600, article_base=100),
    GpuClass("A30", r"\bA30\b", 933),
    GpuClass("A40", r"\bA40\b", 696),
    GpuClass("L40S", r"\bL40S\b", 864),
    GpuClass("L40", r"\bL40\b", 864),
    GpuClass("L20", r"\bL20\b", 864),
    GpuClass("L4", r"\bL4\b", 300),
    # "RTX 6000 Ada Generation" and "RTX A6000" are different cards; neither pattern can match
    # the other's name.
    GpuClass("RTXPRO6000", r"\bRTX PRO 6000\b", 1792),
    GpuClass("RTX6000ADA", r"\bRTX 6000 ADA\b", 960),
    GpuClass("RTXA6000", r"\bRTX A6000\b", 768),
    GpuClass("RTX5090", r"\bRTX ?5090\b", 1792),
    GpuClass("RTX4090", r"\bRTX ?4090\b", 1008),
    GpuClass("RTX3090", r"\bRTX ?3090\b", 936),
    GpuClass("V100", r"\bV100\b", 900),
    GpuClass("T4", r"\bT4\b", 320),
)

_COMPILED = [(re.compile(c.pattern), c.name) for c in CLASSES]
BASE_WEIGHTS: dict[str, int] = {c.name: c.base_weight for c in CLASSES}


def normalize_name(name: str) -> str:
    return " ".join(name.upper().split())


def classify_gpu(name: str, overrides: dict[str, str] | None = None) -> str:
    """Class for a device name. Operator overrides (case-insensitive substrings) win, in order."""
    norm = normalize_name(name)
    for substring, cls in (overrides or {}).items():
        if normalize_name(substring) in norm:
            return cls
    for pattern, cls in _COMPILED:
        if pattern.search(norm):
            return cls
    return UNKNOWN
