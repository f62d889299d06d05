"""How long to wait before retrying something that failed: capped exponential backoff with jitter."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, *, base: float, cap: float) -> float:
    """Seconds to wait after failed attempt number `attempt` (0 for the first failure): `base * 2**attempt`, at most
    `cap`, then scaled by a random factor in [0.5, 1].

    The jitter keeps many clients that failed together (one outage, one restart) from retrying together; keeping at
    least half the delay keeps the backoff from collapsing to zero."""
    # Callers that retry forever pass ever larger attempts, and 2.0**1024 raises OverflowError.
    exponent = min(attempt, 64)
    return min(cap, base * 2.0**exponent) * random.uniform(0.5, 1.0)
