"""Micro-benchmark of narsuite.esp.transform against bare cryptography calls and scapy, in one run.

    python bench/bench_esp.py [--repeat 5] [--count 4000]

For every transform and payload size (64, 512, 1400 bytes) it times ``OutboundSA.encapsulate``
and ``InboundSA.decapsulate`` (replay window 128 on, every packet fresh) over ``--count``
prepared inputs, best of ``--repeat`` passes, and next to them the floor: the same cipher and MAC
work done with ``cryptography`` directly on the same sizes, once with the objects prebuilt (what
cannot be beaten from Python) and once the usual way, building the ``Cipher``/``AESGCM``/``HMAC``
per packet.  A second anchor is scapy's ``SecurityAssociation`` encrypt+decrypt of 1400 bytes.
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cryptography
import scapy
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from scapy.compat import raw
from scapy.layers.inet import IP, UDP
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.packet import Raw

from narsuite.esp.transform import TRANSFORMS, InboundSA, OutboundSA, Transform

SPI = 0x0000_1001
SIZES = (64, 512, 1400)
HASH = {"hmac-sha1-96": hashes.SHA1, "hmac-sha256-128": hashes.SHA256}
SCAPY_ENC = {"aes-gcm-16": "AES-GCM", "aes-cbc": "AES-CBC", "null": "NULL"}
SCAPY_AUTH = {None: None, "hmac-sha1-96": "HMAC-SHA1-96", "hmac-sha256-128": "SHA2-256-128"}


def per_item(make: Callable[[], Callable[..., object]], args: Sequence[tuple], repeat: int) -> float:
    """Best time per call in seconds over ``repeat`` passes of ``make()`` applied to each of ``args``.

    ``make`` is called before each pass (untimed), so a pass can start from a fresh SA.
    """
    best = float("inf")
    for _ in range(repeat):
        fn = make()
        t0 = time.perf_counter()
        for a in args:
            fn(*a)
        best = min(best, time.perf_counter() - t0)
    return best / len(args)


def name(tr: Transform) -> str:
    return f"{tr.enc}-{tr.enc_key_bits}" + (f" + {tr.integ}" if tr.integ else "") if tr.enc_key_bits else \
        f"{tr.enc} + {tr.integ}"


def floors(tr: Transform, ek: bytes, ik: bytes | None, size: int) -> tuple[Callable[[bytes], object], ...]:
    """(prebuilt encrypt, prebuilt decrypt, per-packet encrypt, per-packet decrypt) doing the
    transform's cipher + MAC work on ``size`` bytes (plus the ESP trailer) with cryptography."""
    n = size + 2 + (-(size + 2) % tr.block_size)
    aad = os.urandom(8)
    if tr.enc == "aes-gcm-16":
        key, nonce = ek[:-4], os.urandom(12)
        g = AESGCM(key)
        ct = g.encrypt(nonce, os.urandom(n), aad)
        return (lambda p: g.encrypt(nonce, p, aad), lambda _: g.decrypt(nonce, ct, aad),
                lambda p: AESGCM(key).encrypt(nonce, p, aad), lambda _: AESGCM(key).decrypt(nonce, ct, aad))
    icv = tr.icv_len
    mac = hmac.HMAC(ik, HASH[tr.integ]())  # type: ignore[arg-type,index]
    h = HASH[tr.integ]  # type: ignore[index]

    def mac_pre(data: bytes) -> bytes:
        m = mac.copy()
        m.update(data)
        return m.finalize()[:icv]

    def mac_new(data: bytes) -> bytes:
        m = hmac.HMAC(ik, h())  # type: ignore[arg-type]
        m.update(data)
        return m.finalize()[:icv]

    if tr.enc == "null":
        return mac_pre, mac_pre, mac_new, mac_new
    aes = algorithms.AES(ek)
    enc = Cipher(aes, modes.CBC(bytes(16))).encryptor()
    dec = Cipher(aes, modes.CBC(bytes(16))).decryptor()
    ct = os.urandom(n)

    def enc_new(p: bytes) -> bytes:
        e = Cipher(aes, modes.CBC(os.urandom(16))).encryptor()
        return mac_new(e.update(p) + e.finalize())

    def dec_new(_: bytes) -> bytes:
        mac_new(ct)
        d = Cipher(aes, modes.CBC(ct[:16])).decryptor()
        return d.update(ct[16:]) + d.finalize()

    return (lambda p: mac_pre(enc.update(p)), lambda _: (mac_pre(ct), dec.update(ct)), enc_new, dec_new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="passes per measurement (best kept)")
    ap.add_argument("--count", type=int, default=4000, help="packets per pass")
    args = ap.parse_args()

    print(f"Python {platform.python_version()}, cryptography {cryptography.__version__}, scapy {scapy.VERSION}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs; best of {args.repeat} passes of {args.count} packets.\n")
    print("| transform | payload B | encapsulate µs | decapsulate µs | ours enc+dec µs "
          "| floor enc+dec µs (prebuilt) | ours / floor | usual enc+dec µs (objects per packet) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for tr in TRANSFORMS:
        ek = os.urandom(tr.enc_key_len)
        ik = os.urandom(tr.integ_key_len) if tr.integ else None
        for size in SIZES:
            payload = os.urandom(size)
            items = [(payload, 4)] * args.count
            t_enc = per_item(lambda tr=tr, ek=ek, ik=ik: OutboundSA(SPI, tr.enc, ek, tr.integ, ik).encapsulate, items,
                             args.repeat)
            sender = OutboundSA(SPI, tr.enc, ek, tr.integ, ik)
            pkts = [(sender.encapsulate(payload, 4),) for _ in range(args.count)]
            t_dec = per_item(lambda tr=tr, ek=ek, ik=ik: InboundSA(SPI, tr.enc, ek, tr.integ, ik).decapsulate, pkts,
                             args.repeat)
            plain = [(os.urandom(size + 2 + (-(size + 2) % tr.block_size)),)] * args.count
            f_enc, f_dec, n_enc, n_dec = floors(tr, ek, ik, size)
            fl = sum(per_item(lambda f=f: f, plain, args.repeat) for f in (f_enc, f_dec))
            usual = sum(per_item(lambda f=f: f, plain, args.repeat) for f in (n_enc, n_dec))
            ours = t_enc + t_dec
            print(f"| {name(tr)} | {size} | {t_enc * 1e6:.2f} | {t_dec * 1e6:.2f} | {ours * 1e6:.2f} "
                  f"| {fl * 1e6:.2f} | {ours / fl:.1f}× | {usual * 1e6:.2f} |")

    print("\nSecond anchor: scapy SecurityAssociation encrypt + decrypt of a 1400-byte payload "
          "(tunnel mode, inner IPv4 packet).\n")
    print("| transform | scapy enc+dec µs | narsuite enc+dec µs | speed-up |")
    print("|---|---:|---:|---:|")
    inner = IP(raw(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / Raw(os.urandom(1400 - 28))))
    for tr in (TRANSFORMS[0], TRANSFORMS[2], TRANSFORMS[6]):
        ek = os.urandom(tr.enc_key_len)
        ik = os.urandom(tr.integ_key_len) if tr.integ else None
        sa = SecurityAssociation(ESP, spi=SPI, crypt_algo=SCAPY_ENC[tr.enc], crypt_key=ek or None,
                                 auth_algo=SCAPY_AUTH[tr.integ], auth_key=ik,
                                 tunnel_header=IP(src="192.0.2.1", dst="192.0.2.2"))
        n = max(50, args.count // 40)
        t_scapy = per_item(lambda sa=sa: lambda p: sa.decrypt(sa.encrypt(p)), [(inner,)] * n, args.repeat)

        def round_trip(tr: Transform = tr, ek: bytes = ek, ik: bytes | None = ik) -> Callable[[bytes], object]:
            out = OutboundSA(SPI, tr.enc, ek, tr.integ, ik)
            inb = InboundSA(SPI, tr.enc, ek, tr.integ, ik)
            return lambda p: inb.decapsulate(out.encapsulate(p, 4))

        t_ours = per_item(round_trip, [(raw(inner),)] * args.count, args.repeat)
        print(f"| {name(tr)} | {t_scapy * 1e6:.0f} | {t_ours * 1e6:.2f} | {t_scapy / t_ours:.0f}× |")


if __name__ == "__main__":
    main()
