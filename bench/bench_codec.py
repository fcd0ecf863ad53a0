"""Micro-benchmark of narsuite.packet.codec against scapy (the anchor), in one run.

    python bench/bench_codec.py [--repeat 5] [--size 1400]

Each operation is timed with timeit: the loop count comes from Timer.autorange() (about 0.2 s
per sample), the best of --repeat samples is kept (the least disturbed by other processes).
Prints a markdown table: microseconds per operation, operations per second, and how many
times faster the codec is than scapy doing the same job the way scapy code normally does it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import timeit
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import scapy
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import GRE
from scapy.packet import Raw
from scapy.utils import checksum as scapy_checksum

from narsuite.packet import codec as C

SRC, DST, NEW = "10.0.0.1", "192.168.7.9", "172.16.0.33"
OUT_SRC, OUT_DST = "198.51.100.1", "203.0.113.2"


def best(fn: Callable[[], object], repeat: int) -> float:
    """Best time per call in seconds."""
    t = timeit.Timer(fn)
    number, _ = t.autorange()
    return min(t.repeat(repeat=repeat, number=number)) / number


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="samples per operation (best kept)")
    ap.add_argument("--size", type=int, default=1400, help="IPv4 packet size in bytes")
    args = ap.parse_args()

    src, dst, new = C.addr_to_bytes(SRC), C.addr_to_bytes(DST), C.addr_to_bytes(NEW)
    osrc, odst = C.addr_to_bytes(OUT_SRC), C.addr_to_bytes(OUT_DST)
    payload = os.urandom(args.size - 28)
    pkt = C.build_ipv4(src, dst, C.PROTO_UDP, C.build_udp(4500, 4500, payload, src=src, dst=dst),
                       ident=1)
    assert pkt == bytes(IP(src=SRC, dst=DST, id=1) / UDP(sport=4500, dport=4500) / Raw(payload))
    data = pkt[:1400] if len(pkt) >= 1400 else os.urandom(1400)
    ipip = C.ipip_encapsulate(pkt, osrc, odst, ident=7)
    gre = C.gre_encapsulate(pkt, osrc, odst, key=42)
    assert gre == bytes(IP(src=OUT_SRC, dst=OUT_DST, id=0) / GRE(key_present=1, key=42, proto=0x0800)
                        / Raw(pkt))

    def ours_parse():
        h, seg = C.parse_ipv4(pkt)
        return C.parse_udp(seg)

    def ours_build():
        return C.build_ipv4(src, dst, 17, C.build_udp(4500, 4500, payload, src=src, dst=dst), ident=1)

    def scapy_rewrite():
        p = IP(pkt)
        p.dst = NEW
        del p.chksum
        del p[UDP].chksum
        return bytes(p)

    def scapy_ttl():
        p = IP(pkt)
        p.ttl -= 1
        del p.chksum
        return bytes(p)

    # (name, ours, scapy); the scapy side is written as scapy code would normally be.
    ops: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        ("parse IPv4+UDP", ours_parse, lambda: IP(pkt)),
        ("build IPv4+UDP (both checksums)", ours_build,
         lambda: bytes(IP(src=SRC, dst=DST, id=1) / UDP(sport=4500, dport=4500) / Raw(payload))),
        ("internet checksum, 1400 bytes", lambda: C.internet_checksum(data),
         lambda: scapy_checksum(data)),
        ("rewrite_ipv4_dst (IP+UDP checksums)", lambda: C.rewrite_ipv4_dst(pkt, new), scapy_rewrite),
        ("decrement_ttl", lambda: C.decrement_ttl(pkt), scapy_ttl),
        ("ipip_encapsulate", lambda: C.ipip_encapsulate(pkt, osrc, odst, ident=7),
         lambda: bytes(IP(src=OUT_SRC, dst=OUT_DST, proto=4, id=7) / Raw(pkt))),
        ("ipip decapsulate", lambda: C.decapsulate(ipip), lambda: bytes(IP(ipip).payload)),
        ("gre_encapsulate (key)", lambda: C.gre_encapsulate(pkt, osrc, odst, key=42),
         lambda: bytes(IP(src=OUT_SRC, dst=OUT_DST, id=0) / GRE(key_present=1, key=42, proto=0x0800)
                       / Raw(pkt))),
        ("gre decapsulate", lambda: C.decapsulate(gre), lambda: bytes(IP(gre)[GRE].payload)),
        ("peek_ipv4", lambda: C.peek_ipv4(pkt), None),
    ]

    print(f"Python {platform.python_version()}, scapy {scapy.VERSION}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs; {len(pkt)}-byte IPv4/UDP packet; best of {args.repeat}\n")
    print("| operation | narsuite µs/op | narsuite ops/s | scapy µs/op | scapy ops/s | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ours, theirs in ops:
        t_ours = best(ours, args.repeat)
        if theirs is None:
            print(f"| {name} | {t_ours * 1e6:.2f} | {1 / t_ours:,.0f} | – | – | – |")
            continue
        t_theirs = best(theirs, args.repeat)
        print(f"| {name} | {t_ours * 1e6:.2f} | {1 / t_ours:,.0f} | {t_theirs * 1e6:.1f} | "
              f"{1 / t_theirs:,.0f} | {t_theirs / t_ours:,.0f}× |", flush=True)


if __name__ == "__main__":
    main()
