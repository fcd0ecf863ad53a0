"""The mipproxy data path's per-packet CPU, against the ESP step it carries, in one run.

    python bench/bench_mip_datapath.py [--repeat 5] [--count 5000]

For 64- and 1400-byte inner packets, each way, it times the proxy's tunnel step as the
role runs it (``DataPath``: decapsulation, the §5.3 checks, the binding lookup in the store,
encapsulation) with the I/O calls stubbed out, best of ``--repeat`` passes:

* MN -> gateway: RFC 3519 UDP tunnel data (``udp_received``) and IP-in-IP (``raw_received``);
* gateway -> MN: ``from_tun`` to a UDP-tunnelled and an IP-in-IP binding;
* then RFC 3519 tunnel data with next header 47 (GRE) and 55 (minimal encapsulation), both ways;
* then plain GRE (protocol 47, RFC 2784) and plain minimal encapsulation (protocol 55,
  RFC 2004) on the raw sockets, both ways: with IP-in-IP, every encapsulation the role
  accepts from an MN and sends to it;

and, as the anchor, the esp role's own step for the same packet (narsuite.esp.transform,
AES-GCM-128 tunnel mode: ``OutboundSA.encapsulate`` / ``InboundSA.decapsulate`` of the inner
packet).  The issue's target: the proxy's step costs less than the ESP step.  Syscalls are
not included on either side (``bench_mip.py`` measures a real daemon's registrations).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet.task import Clock

from narsuite import config as cfgmod
from narsuite.esp.transform import InboundSA, OutboundSA
from narsuite.mipproxy.datapath import DataPath
from narsuite.mipproxy.records import KINDS, Binding
from narsuite.packet import codec
from narsuite.store import MemoryBackend, Store

PUB, PRIV, HA, GW, HOME = "203.0.113.1", "10.2.0.1", "10.2.0.2", "10.2.0.3", "10.2.0.100"
COA, NAT = "192.168.10.10", ("203.0.113.2", 40000)
A = socket.inet_aton


def best(fn: Any, args: list, repeat: int) -> float:
    t = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        for a in args:
            fn(*a)
        t = min(t, time.process_time() - t0)
    return t / len(args)


def datapath(encap: str, nh: int = 4) -> DataPath:
    cfg = cfgmod.loads(f'[mipproxy]\npublic_address = "{PUB}"\nprivate_address = "{PRIV}"\n'
                       f'home_agents = ["{HA}"]\nvpn_gateways = ["{GW}"]\n').role("mipproxy")
    clock = Clock()
    store = Store(MemoryBackend(), clock)
    for k in KINDS:
        store.register(k)
    store.open()
    udp = encap == "udp"
    store.put(Binding(HOME, COA, HA, 1, 600, 4096, NAT[0] if udp else COA, NAT[1] if udp else 0,
                      encapsulation=encap, udp_next_header=nh), ttl=600)
    dp = DataPath(cfg, store, clock, send_udp=lambda d, a: True)
    store.subscribe(dp.store_changed)  # as the service does
    dp.tun_write = lambda p: True
    dp.send_raw = lambda p, nh=None: True
    return dp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--count", type=int, default=5000)
    args = ap.parse_args()
    key = os.urandom(20)
    print(f"best of {args.repeat} passes of {args.count} packets, CPU time (process_time)\n")
    print("| inner B | MN→GW UDP µs | MN→GW IP-in-IP µs | ESP decap µs (what the gateway does "
          "next) | GW→MN UDP µs | GW→MN IP-in-IP µs | ESP encap µs (what the gateway did before) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    rows: list[tuple[int, bytes, bytes, float, float]] = []
    for size in (64, 1400):
        payload = os.urandom(size - 28)
        esp_body = os.urandom(8) + payload  # SPI, seq, "ciphertext"
        inner = codec.build_ipv4(A(HOME), A(GW), codec.PROTO_ESP, esp_body)
        to_mn = codec.build_ipv4(A(GW), A(HOME), codec.PROTO_ESP, esp_body)
        udp_dp, ipip_dp = datapath("udp"), datapath("ipip")
        tdata = b"\x04\x04\x00\x00" + inner
        outer = codec.ipip_encapsulate(inner, A(COA), A(PUB))
        n = args.count
        t_udp_in = best(udp_dp.udp_received, [(tdata, NAT)] * n, args.repeat)
        t_ipip_in = best(ipip_dp.raw_received, [(outer, COA)] * n, args.repeat)
        t_udp_out = best(udp_dp.from_tun, [(to_mn,)] * n, args.repeat)
        t_ipip_out = best(ipip_dp.from_tun, [(to_mn,)] * n, args.repeat)
        assert udp_dp.counters["mn_to_gateway"] and ipip_dp.counters["gateway_to_mn"]
        assert not any(v for k, v in udp_dp.counters.items() if k.startswith("drop_"))
        # the ESP step for the same inner packet (what the esp role does with it)
        clear = codec.build_ipv4(A("10.2.0.3"), A(HOME), codec.PROTO_UDP, os.urandom(size - 20 - 40))
        enc = OutboundSA(0x1001, "aes-gcm-16", key, None, None)
        t_enc = best(lambda p, enc=enc: enc.encapsulate(p, 4), [(clear,)] * n, args.repeat)
        pkts = [(enc.encapsulate(clear, 4),) for _ in range(n)]
        t_dec = min(best(InboundSA(0x1001, "aes-gcm-16", key, None, None).decapsulate, pkts, 1)
                    for _ in range(args.repeat))
        print(f"| {size} | {t_udp_in * 1e6:.2f} | {t_ipip_in * 1e6:.2f} | {t_dec * 1e6:.2f} | "
              f"{t_udp_out * 1e6:.2f} | {t_ipip_out * 1e6:.2f} | {t_enc * 1e6:.2f} |")
        rows.append((size, inner, to_mn, t_dec, t_enc))
    # RFC 3519 tunnel data with the other next headers the MN may register (47 GRE, 55
    # minimal encapsulation): the same steps, the same anchors
    print("\n| inner B | next header | MN→GW UDP µs | ESP decap µs | GW→MN UDP µs | ESP encap µs |")
    print("|---:|---:|---:|---:|---:|---:|")
    for size, inner, to_mn, t_dec, t_enc in rows:
        for nh, body in ((47, b"\x00\x00\x08\x00" + inner),
                         (55, codec.minimal_forwarding(inner, A(COA)))):
            dp = datapath("udp", nh)
            tdata = bytes([4, nh, 0, 0]) + body
            t_in = best(dp.udp_received, [(tdata, NAT)] * args.count, args.repeat)
            t_out = best(dp.from_tun, [(to_mn,)] * args.count, args.repeat)
            assert dp.counters["mn_to_gateway"] and dp.counters["gateway_to_mn"]
            assert not any(v for k, v in dp.counters.items() if k.startswith("drop_"))
            print(f"| {size} | {nh} | {t_in * 1e6:.2f} | {t_dec * 1e6:.2f} | {t_out * 1e6:.2f} | "
                  f"{t_enc * 1e6:.2f} |")
    # plain GRE and minimal encapsulation to MIPP-Pub (raw sockets), both ways
    print("\n| inner B | encapsulation | MN→GW µs | ESP decap µs | GW→MN µs | ESP encap µs |")
    print("|---:|---|---:|---:|---:|---:|")
    for size, inner, to_mn, t_dec, t_enc in rows:
        for encap, outer in (("gre", codec.gre_encapsulate(inner, A(COA), A(PUB))),
                             ("minimal", codec.minimal_encapsulate(inner, A(COA), A(PUB)))):
            dp = datapath(encap)
            t_in = best(dp.raw_received, [(outer, COA)] * args.count, args.repeat)
            t_out = best(dp.from_tun, [(to_mn,)] * args.count, args.repeat)
            assert dp.counters["mn_to_gateway"] and dp.counters["gateway_to_mn"]
            assert not any(v for k, v in dp.counters.items() if k.startswith("drop_"))
            print(f"| {size} | {encap} | {t_in * 1e6:.2f} | {t_dec * 1e6:.2f} | {t_out * 1e6:.2f} | "
                  f"{t_enc * 1e6:.2f} |")


if __name__ == "__main__":
    main()
