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


def default_route_source(route_file: str = "/proc/net/route") -> str | None:
    """The IPv4 source address of the default route (N's address towards "the
    internet"), or None without one.  Reads the routing table; sends nothing."""
    try:
        with open(route_file) as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 8 or fields[1] != "00000000" or fields[7] != "00000000":
            continue
        gateway = socket.inet_ntoa(int(fields[2], 16).to_bytes(4, "little"))
        metric = int(fields[6])
        if best is None or metric < best[0]:
            best = (metric, gateway)
    if best is None:
        return None
    src = source_address(best[1], "")
    return src or None


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
