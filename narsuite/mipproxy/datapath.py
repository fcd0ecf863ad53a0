"""The data path (draft §5, §6): tunnels from MNs to the VPN gateway and back.  (In progress.)"""

from __future__ import annotations

from typing import Any

__all__ = ["DataPath"]


class DataPath:
    def __init__(self, cfg: Any, store: Any, clock: Any, *, metrics: Any = None,
                 send_udp: Any = None) -> None:
        self.cfg = cfg
        self.store = store
        self.clock = clock
        self.counters: dict[str, int] = {}

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def udp_received(self, data: bytes, addr: tuple[str, int]) -> None:
        pass

    def store_changed(self, change: Any) -> None:
        pass
