"""Where the registration relay's CPU goes: the mipproxy relay in-process, no sockets.

Run:
    python bench/profile_mip.py [-n 20000] [--window 16] [--repeat 5] [--profile] [--top 30]

What runs: :class:`RegistrationRelay` with the config ``bench/bench_mip.py`` gives the daemon
(parsed by the real config loader), on a memory store with the mipproxy kinds and a subscriber
(as the service subscribes), driven as ``bench_mip.py`` drives the daemon: ``--window``
requests from the MN, then the HA's answers to what the relay sent it, then the next window.
The MN's requests and the HA's replies are built outside the measured time (the HA's with the
bench's own HMAC code, from each relayed request); only ``request_received`` and
``reply_received`` are timed (``time.process_time``) and, with ``--profile``, profiled.

Output: CPU µs per registration (request + reply), best and median of ``--repeat`` runs; with
``--profile`` the top functions by own and by cumulative time.  This is the relay alone: the
daemon adds Twisted's UDP path (bench_mip.py's anchor, ~10 µs per registration) and the
reactor's turns.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_mip as B  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from narsuite import config as cfgmod  # noqa: E402
from narsuite.mipproxy.records import KINDS  # noqa: E402
from narsuite.mipproxy.registration import RegistrationRelay  # noqa: E402
from narsuite.store import MemoryBackend, Store  # noqa: E402

CONFIG = B.MIPPROXY_TOML


def ha_reply(relayed: bytes) -> bytes:
    """The bench's home agent: accept, echo lifetime, home address and identification."""
    ident = struct.unpack_from("!Q", relayed, 16)[0]
    life = struct.unpack_from("!H", relayed, 2)[0]
    return B.auth(struct.pack("!BBH4s4sQ", 3, 0, life, relayed[4:8], B.A(B.HA), ident))


def run(n: int, window: int, prof: cProfile.Profile | None) -> float:
    """CPU seconds per registration over ``n`` registrations."""
    clock = Clock()
    clock.advance(time.time())
    store = Store(MemoryBackend(), clock)
    for k in KINDS:
        store.register(k)
    store.open()
    store.start()
    store.subscribe(lambda change: None, kinds=[k.name for k in KINDS])
    to_ha: list[tuple[bytes, tuple[str, int]]] = []
    to_mn: list[tuple[bytes, tuple[str, int]]] = []
    relay = RegistrationRelay(cfgmod.loads(CONFIG).role("mipproxy"), store, clock,
                              send_public=lambda d, a: to_mn.append((d, a)),
                              send_private=lambda d, a: to_ha.append((d, a)))
    base = (int(time.time()) + B.NTP) << 32
    ident = 0
    cpu = 0.0
    done = 0
    mn_addr = (B.MN, 40000)
    ha_addr = (B.HA, 434)
    pt = time.process_time
    while done < n:
        reqs = []
        for _ in range(window):
            ident += 1
            reqs.append(B.request(base + ident))
        to_ha.clear()
        to_mn.clear()
        t0 = pt()
        if prof:
            prof.enable()
        for r in reqs:
            relay.request_received(r, mn_addr)
        if prof:
            prof.disable()
        cpu += pt() - t0
        replies = [ha_reply(d) for d, _ in to_ha]
        t0 = pt()
        if prof:
            prof.enable()
        for r in replies:
            relay.reply_received(r, ha_addr)
        if prof:
            prof.disable()
        cpu += pt() - t0
        if len(to_mn) != window or any(d[1] != 0 for d, _ in to_mn):
            raise SystemExit(f"relay answered {len(to_mn)} of {window}: "
                             f"{[d[1] for d, _ in to_mn]} {relay.counters.values}")
        done += window
        clock.advance(0.001)
    relay.stop()
    return cpu / done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=20000)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    run(2000, args.window, None)  # warm-up
    results = [run(args.n, args.window, None) * 1e6 for _ in range(args.repeat)]
    print(f"relay CPU per registration: best {min(results):.1f} µs, median "
          f"{statistics.median(results):.1f} µs ({', '.join(f'{r:.1f}' for r in results)})")
    if args.profile:
        prof = cProfile.Profile()
        run(args.n, args.window, prof)
        st = pstats.Stats(prof)
        st.sort_stats("tottime").print_stats(args.top)
        st.sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
