"""Token buckets: how often we may do something an unauthenticated sender can trigger.

An unprotected notification (RFC 2408 §5: sent before any key exists) answers a
datagram whose source address nobody has checked, so a flood of bad datagrams
with spoofed sources would turn us into a reflector.  A bucket lets ``burst``
actions through at once and ``rate`` per second after that; what it refuses is
counted (``refused``) and simply not done.  Time comes from the reactor clock, so
tests drive it with ``task.Clock``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TokenBucket"]


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; ``rate`` 0 refuses everything."""

    __slots__ = ("rate", "burst", "clock", "tokens", "stamp", "allowed", "refused")

    def __init__(self, rate: float, burst: float, clock: Any) -> None:
        if rate < 0 or burst < 0:
            raise ValueError("a token bucket needs a rate and a burst >= 0")
        self.rate = float(rate)
        self.burst = float(burst)
        self.clock = clock
        self.tokens = float(burst)
        self.stamp = clock.seconds()
        self.allowed = 0
        self.refused = 0

    def take(self, n: float = 1.0) -> bool:
        """Spend ``n`` tokens if there are that many (True), else count a refusal (False)."""
        now = self.clock.seconds()
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            self.allowed += 1
            return True
        self.refused += 1
        return False
