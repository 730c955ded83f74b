"""GPU class table: NVML device name -> the short class the scheduler and clients talk about.

Rules are regexes over a normalised name (uppercase, single spaces). Every model number is
anchored with ``\\b`` on both sides, so "A10" cannot match inside "A100" or "A10G", "L40" cannot
match "L40S", and "H200" cannot match inside "GH200" (G and H are both word characters, so there
is no boundary between them). The order still puts the more specific rule first, so a later edit
that loosens a pattern does not silently change results.
"""

from __future__ import annotations

import re

UNKNOWN = "UNKNOWN"

_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), cls)
    for p, cls in [
        (r"\bGH200\b", "GH200"),
        (r"\bB200\b", "B200"),
        (r"\bH200\b", "H200"),
        (r"\bH100\b", "H100"),
        (r"\bA100\b", "A100"),
        (r"\bA10G\b", "A10G"),
        (r"\bA10\b", "A10"),
        (r"\bA30\b", "A30"),
        (r"\bA40\b", "A40"),
        (r"\bL40S\b", "L40S"),
        (r"\bL40\b", "L40"),
        (r"\bL4\b", "L4"),
        # "RTX 6000 Ada Generation" and "RTX A6000" are different cards; neither pattern can
        # match the other's name.
        (r"\bRTX 6000 ADA\b", "RTX6000ADA"),
        (r"\bRTX A6000\b", "RTXA6000"),
        (r"\bRTX ?4090\b", "RTX4090"),
        (r"\bRTX ?3090\b", "RTX3090"),
        (r"\bV100\b", "V100"),
        (r"\bT4\b", "T4"),
    ]
]


def normalize_name(name: str) -> str:
    return " ".join(name.upper().split())


def classify_gpu(name: str, overrides: dict[str, str] | None = None) -> str:
    """Class for a device name. Operator overrides (case-insensitive substrings) win, in order."""
    norm = normalize_name(name)
    for substring, cls in (overrides or {}).items():
        if normalize_name(substring) in norm:
            return cls
    for pattern, cls in _RULES:
        if pattern.search(norm):
            return cls
    return UNKNOWN
