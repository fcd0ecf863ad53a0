"""Per-address cost of the UDP offload's route lookup (``ip route get``): pyroute2 (the anchor,
what narsuite.nar.udpoffload.kernel_route used until this was written) against the struct-built
RTM_GETROUTE of narsuite.packet.rtnl, raw and through kernel_route (ioctls for MTU and link type
included).  Each lookup asks a different address (no cache in our way; the kernel's FIB is the
same for all).  Run as: python bench/bench_route_get.py [COUNT]
"""

from __future__ import annotations

import sys
import time

from narsuite.nar import udpoffload
from narsuite.packet import rtnl


def _addresses(n: int) -> list[str]:
    return [f"10.{i // 250 % 250}.{i % 250}.1" for i in range(n)]


def _per_call(fn, addrs: list[str]) -> float:
    fn(addrs[0])  # open sockets, import
    t = time.perf_counter()
    for a in addrs:
        fn(a)
    return (time.perf_counter() - t) / len(addrs) * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    from pyroute2 import IPRoute

    ipr = IPRoute()
    rs = rtnl.RouteSocket()
    addrs = _addresses(n)

    def anchor(ip: str) -> object:
        try:
            return ipr.route("get", dst=ip)[0]
        except Exception:
            return None

    a = _per_call(anchor, addrs)
    r = _per_call(rs.get, addrs)
    k = _per_call(udpoffload.kernel_route, addrs)
    print(f"route get x{n}: pyroute2 {a:.1f} us (anchor), rtnl.RouteSocket.get {r:.1f} us ({a / r:.1f}x), "
          f"kernel_route {k:.1f} us ({a / k:.1f}x)")
    ipr.close()
    rs.close()


if __name__ == "__main__":
    main()
