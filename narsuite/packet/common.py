"""Small pieces shared by the packet ports (TUN devices, raw sockets)."""

from __future__ import annotations

import errno as _errno
from collections.abc import Callable, Hashable
from typing import Any

from narsuite.logs import logger

__all__ = ["as_callback", "errno_names", "RateLimitedLog"]

log = logger()


def as_callback(sink: Any) -> Callable[..., None] | None:
    """The callable to invoke per packet: ``sink.packetReceived`` or ``sink`` itself."""
    if sink is None:
        return None
    method = getattr(sink, "packetReceived", None)
    if method is not None:
        return method
    if callable(sink):
        return sink
    raise TypeError(f"{sink!r} has no packetReceived() and is not callable")


def errno_names(counts: dict[int, int]) -> dict[str, int]:
    """``{errno: n}`` -> ``{"EHOSTUNREACH": n}`` for counters shown to operators."""
    return {_errno.errorcode.get(k, str(k)): v for k, v in counts.items()}


class RateLimitedLog:
    """Log the 1st, then every 1000th occurrence of each error key (no log floods).

    A data plane that cannot send (no route, buffer full) sees the same error
    for every packet; one line per thousand keeps the log readable and the
    counters carry the exact numbers.
    """

    def __init__(self, what: str, every: int = 1000) -> None:
        self._what = what
        self._every = every
        self._seen: dict[Hashable, int] = {}

    def __call__(self, key: Hashable, detail: str) -> None:
        n = self._seen.get(key, 0) + 1
        self._seen[key] = n
        if n == 1 or n % self._every == 0:
            log.warn("{what}: {detail} (occurrence {n})", what=self._what, detail=detail, n=n)
