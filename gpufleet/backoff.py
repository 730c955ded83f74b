"""The one back-off rule: exponential from ``initial_s``, capped at ``max_s``, optionally jittered.

Pure apart from the random draw (which a caller may replace), so it is table-tested. Every retry
loop that waits longer after each failure uses it: the agent's registration in etcd, etcd list/watch,
the etcd transport's pause between rounds of endpoints, instance restarts and outlier ejection.
"""

from __future__ import annotations

import random
from collections.abc import Callable

# 2**62 × any sane initial_s is far above any cap: a longer streak changes nothing but could
# overflow a float.
_MAX_EXPONENT = 62

NO_JITTER = (1.0, 1.0)
# Retries of many clients against one server: each waits between half and all of the delay, so
# 1,000 agents do not arrive at a recovering etcd together ("equal jitter").
HALF_JITTER = (0.5, 1.0)


def backoff_delay(
    attempt: int,
    initial_s: float,
    max_s: float,
    jitter: tuple[float, float] = NO_JITTER,
    uniform: Callable[[float, float], float] | None = None,
) -> float:
    """Seconds to wait before retry number ``attempt`` (0 = the first retry).

    ``min(max_s, initial_s × 2**attempt)``, then multiplied by a factor drawn uniformly from
    ``jitter`` (``(1.0, 1.0)``: none).
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, not {attempt}")
    delay = min(max_s, initial_s * 2 ** min(attempt, _MAX_EXPONENT))
    lo, hi = jitter
    if lo == hi == 1.0:
        return delay
    return delay * (uniform or random.uniform)(lo, hi)
