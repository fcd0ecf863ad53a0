"""Questions for the kernel's routing table, asked without sending anything."""

from __future__ import annotations

import ipaddress
import socket

__all__ = ["source_address", "SourceAddresses"]


def source_address(dest: str, fallback: str = "0.0.0.0") -> str:
    """The source address the kernel would choose towards ``dest``.

    A connected UDP socket asks the routing table and sends no packet.  ``fallback``
    when ``dest`` is not an address, is unspecified, or has no route.
    """
    try:
        ip = ipaddress.ip_address(dest.split("%", 1)[0])
    except ValueError:
        return fallback
    if ip.is_unspecified:
        return fallback
    try:
        with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((dest, 9))
            return s.getsockname()[0]
    except OSError:
        return fallback


class SourceAddresses:
    """:func:`source_address` with a bounded cache, for callers that ask per message."""

    def __init__(self, limit: int = 4096, fallback: str = "0.0.0.0") -> None:
        self._cache: dict[str, str] = {}
        self._limit = limit
        self._fallback = fallback

    def __call__(self, dest: str) -> str:
        cached = self._cache.get(dest)
        if cached is None:
            cached = source_address(dest, self._fallback)
            if len(self._cache) >= self._limit:
                self._cache.clear()
            self._cache[dest] = cached
        return cached
