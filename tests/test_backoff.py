"""The one backoff formula every retry loop uses."""

from __future__ import annotations

from core.backoff import backoff_delay


def test_backoff_doubles_from_its_base_up_to_its_cap_keeping_at_least_half() -> None:
    for attempt, full in [(0, 0.25), (1, 0.5), (2, 1.0), (3, 1.5), (5000, 1.5)]:
        delays = [backoff_delay(attempt, base=0.25, cap=1.5) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays)
        assert max(delays) - min(delays) > full / 10, "jittered"
