#!/usr/bin/env python3
"""An independent Mobile IPv4 mobile node and home agent for narsuite's mipproxy tests.

No Mobile IPv4 implementation is packaged for Debian or PyPI, so the mipproxy role is
tested against this one.  It shares no code with narsuite (nothing here imports
``narsuite``): the fixed headers are scapy's MobileIP layers (RFC 3344 field layout),
the extensions are bytes laid out here from RFC 5944 §3.5, RFC 2794, RFC 3519 and the
draft's §2.5.3, and the MN-HA authenticator is ``hmac`` over those bytes.  A bug in
narsuite's codec therefore cannot hide behind the same bug here.

Commands (each prints JSON on stdout):

``ha``  a home agent on UDP 434: checks every request's MN-HA authenticator with the
        keys given by ``--sa SPI:HEXKEY``, logs each request (bytes, parsed fields,
        extensions, authentication result) as a JSON line to ``--log``, and answers
        with ``--code`` (0 by default; 131 when authentication fails), the home address
        of the request (or ``--assign-home`` for a zero one), its own address as the HA
        field, the request's identification, the NAI (unless ``--omit-nai``) and an
        MN-HA authentication extension.  ``--tunnel`` also decapsulates IP-in-IP from
        the proxy and tunnels packets for bound home addresses back (data path tests).
``mn``  a mobile node: sends one Registration Request to the proxy and prints the
        reply, parsed and authenticated.  ``--replay`` sends the very same bytes a
        second time and prints that reply too.  ``--data N`` then sends N ESP packets
        from the home address to ``--gateway`` through the tunnel (RFC 3519 UDP tunnel
        data with ``--udp-tunnel``, carrying IP-in-IP, GRE or minimal encapsulation as
        ``--udp-encap`` 4/47/55 says; IP-in-IP, GRE or minimal encapsulation on raw sockets
        otherwise) and reports what comes back through the tunnel.
``gw``  a stand-in VPN gateway (two-box tests): echoes every ESP packet it receives
        back to its sender, the MN's home address, routed through the proxy.

Extension numbers of the draft (HA Parameter type/subtype) are options: the draft
left them unassigned, so they are configuration, not knowledge.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import hmac
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time

from scapy.layers.inet import GRE, IP
from scapy.layers.mobileip import MobileIP, MobileIPRRP, MobileIPRRQ
from scapy.packet import Raw

NTP_OFFSET = 2208988800
EXT_MN_HA = 32
EXT_MN_FA = 33
EXT_FA_HA = 34
EXT_NAI = 131
EXT_UDP_TUNNEL_REQUEST = 144
EXT_UDP_TUNNEL_REPLY = 44

# request flags (RFC 5944 3.3; T: RFC 3024)
FLAGS = {"S": 0x80, "B": 0x40, "D": 0x20, "M": 0x10, "G": 0x08, "r": 0x04, "T": 0x02, "x": 0x01}


def ntp_identification(low: int | None = None, offset: float = 0.0) -> int:
    """RFC 5944 §5.7 timestamp: a 64-bit NTP time (seconds since 1900, then the fraction),
    so that each request's identification is larger than the last; ``low`` replaces the
    fraction."""
    now = time.time() + offset
    secs = (int(now) + NTP_OFFSET) & 0xFFFFFFFF
    if low is None:
        low = int((now % 1) * (1 << 32)) & 0xFFFFFFFF
    return (secs << 32) | low


def ext(t: int, body: bytes) -> bytes:
    return bytes([t, len(body)]) + body


def ha_parameter(ha: str, ext_type: int = 127, subtype: int = 0) -> bytes:
    return ext(ext_type, bytes([subtype, 0]) + socket.inet_aton(ha))


def nai_ext(nai: str) -> bytes:
    return ext(EXT_NAI, nai.encode())


def udp_tunnel_request(force: bool = False, encap: int = 4) -> bytes:
    return ext(EXT_UDP_TUNNEL_REQUEST, bytes([0, 0, 0x80 if force else 0, encap, 0, 0]))


def with_auth(message: bytes, spi: int, key: bytes, corrupt: bool = False) -> bytes:
    """Append an MN-HA authentication extension: HMAC-MD5 over everything before the
    authenticator (RFC 5944 §3.5.1: message, prior extensions, type, length, SPI)."""
    covered = message + bytes([EXT_MN_HA, 20]) + struct.pack("!I", spi)
    mac = hmac.new(key, covered, hashlib.md5).digest()
    if corrupt:
        mac = bytes([mac[0] ^ 1]) + mac[1:]
    return covered + mac


def with_fa_ha(message: bytes, spi: int, key: bytes, corrupt: bool = False) -> bytes:
    """What a foreign agent appends to a request it relays, or a home agent to its reply
    to the FA (RFC 5944 3.5.4): the Foreign-Home Authentication extension, HMAC-MD5 over
    the message and every extension before it (the MN-HA one included), its type,
    length and SPI."""
    covered = message + bytes([EXT_FA_HA, 20]) + struct.pack("!I", spi)
    mac = hmac.new(key, covered, hashlib.md5).digest()
    if corrupt:
        mac = bytes([mac[0] ^ 1]) + mac[1:]
    return covered + mac


def fa_relay_request(data: bytes, fa_spi: int | None, fa_key: bytes, *,
                     corrupt: bool = False, fa_exts: bytes = b"") -> bytes:
    """A foreign agent's relay of an MN's request (RFC 5944 3.7.2.2): extensions after
    the MN-HA one are the FA's (an MN-FA extension) and stop at the FA; ``fa_exts`` (the
    FA's own, e.g. its UDP Tunnel Request, RFC 3519 3.1) follow the MN-HA extension; the
    FA-HA authentication is appended when the FA shares an SA with the home agent."""
    out = data
    for t, off, _body in split_extensions(data, 24):
        if t == EXT_MN_HA:
            out = data[: off + 22]
            break
    out += fa_exts
    return with_fa_ha(out, fa_spi, fa_key, corrupt) if fa_spi is not None else out


def fa_check_reply(data: bytes, fa_spi: int, fa_key: bytes) -> tuple[bool, bytes]:
    """What an FA does with a reply from the home agent (RFC 5944 3.7.3.1): check the
    FA-HA authenticator that follows the MN-HA one, then relay the reply up to the end of
    the MN-HA extension (what follows it is for the FA: its FA-HA, a UDP Tunnel Reply).
    Returns (authenticated, the reply for the MN)."""
    mn_ha_end = None
    for t, off, body in split_extensions(data, 20):
        if t == EXT_MN_HA and mn_ha_end is None:
            mn_ha_end = off + 2 + len(body)
        elif t == EXT_FA_HA and mn_ha_end is not None:
            spi = struct.unpack("!I", body[:4])[0]
            mac = hmac.new(fa_key, data[: off + 6], hashlib.md5).digest()
            ok = spi == fa_spi and len(body) == 20 and hmac.compare_digest(mac, body[4:])
            return ok, data[:mn_ha_end]
    return False, data


def fa_udp_tunnel_reply(data: bytes) -> dict | None:
    """The UDP Tunnel Reply (RFC 3519 3.2) a home agent put after the MN-HA extension of a
    reply, for the FA that asked: code, keepalive interval, F bit; None if there is none."""
    seen_mn_ha = False
    for t, _off, body in split_extensions(data, 20):
        if t == EXT_MN_HA:
            seen_mn_ha = True
        elif t == 44 and seen_mn_ha and len(body) == 6:
            flags, keepalive = struct.unpack("!HH", body[2:6])
            return {"code": body[1], "keepalive": keepalive, "forced": bool(flags & 0x8000)}
    return None


def request_bytes(flags: int, lifetime: int, home: str, ha: str, coa: str, ident: int,
                  extensions: bytes) -> bytes:
    hdr = bytes(MobileIP(type=1) / MobileIPRRQ(flags=flags, lifetime=lifetime, homeaddr=home,
                                               haaddr=ha, coaddr=coa, id=ident))
    assert len(hdr) == 24
    return hdr + extensions


def reply_bytes(code: int, lifetime: int, home: str, ha: str, ident: int, extensions: bytes) -> bytes:
    hdr = bytes(MobileIP(type=3) / MobileIPRRP(code=code, lifetime=lifetime, homeaddr=home,
                                               haaddr=ha, id=ident))
    assert len(hdr) == 20
    return hdr + extensions


def split_extensions(data: bytes, start: int) -> list[tuple[int, int, bytes]]:
    out = []
    off = start
    while off < len(data):
        t, n = data[off], data[off + 1]
        out.append((t, off, data[off + 2: off + 2 + n]))
        off += 2 + n
    if off != len(data):
        raise ValueError("extension chain runs past the end")
    return out


def check_auth(data: bytes, start: int, keys: dict[int, bytes]) -> tuple[int | None, bool]:
    for t, off, body in split_extensions(data, start):
        if t == EXT_MN_HA:
            spi = struct.unpack("!I", body[:4])[0]
            key = keys.get(spi)
            if key is None or len(body) != 20:
                return spi, False
            mac = hmac.new(key, data[: off + 6], hashlib.md5).digest()
            return spi, hmac.compare_digest(mac, body[4:])
    return None, False


def parse(data: bytes, keys: dict[int, bytes]) -> dict:
    """A request or reply as a dict (scapy for the fixed part, our walk for extensions)."""
    m = MobileIP(data)
    out: dict = {"type": m.type, "hex": data.hex()}
    if m.type == 1:
        r = m[MobileIPRRQ]
        start = 24
        out.update(flags=r.flags, lifetime=r.lifetime, home=r.homeaddr, ha=r.haaddr,
                   coa=r.coaddr, id=r.id)
    elif m.type == 3:
        r = m[MobileIPRRP]
        start = 20
        out.update(code=r.code, lifetime=r.lifetime, home=r.homeaddr, ha=r.haaddr, id=r.id)
    else:
        return out
    out["exts"] = [[t, body.hex()] for t, _o, body in split_extensions(data, start)]
    spi, ok = check_auth(data, start, keys)
    out.update(spi=spi, auth_ok=ok)
    return out


def parse_keys(items: list[str]) -> dict[int, bytes]:
    keys = {}
    for item in items or []:
        spi, key = item.split(":", 1)
        keys[int(spi, 0)] = bytes.fromhex(key.removeprefix("0x"))
    return keys


TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def open_tun(name: str, addr: str | None, routes: list[str], mtu: int = 1400) -> tuple[int, str]:
    """A TUN device (IFF_TUN | IFF_NO_PI), up, with ``addr`` (/32) and ``routes`` into it."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    res = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    ifname = res[:16].rstrip(b"\0").decode()
    v6 = f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"
    if os.path.exists(v6):
        with open(v6, "w") as f:
            f.write("1")
    subprocess.run(["ip", "link", "set", "dev", ifname, "mtu", str(mtu), "up"], check=True)
    subprocess.run(["sysctl", "-qw", f"net.ipv4.conf.{ifname}.rp_filter=0"], check=False)
    src = []
    if addr:
        subprocess.run(["ip", "addr", "add", f"{addr}/32", "dev", ifname], check=True)
        src = ["src", addr]
    for r in routes:
        subprocess.run(["ip", "route", "replace", r, "dev", ifname, *src], check=True)
    return fd, ifname


# ----------------------------------------------------------------------------- HA
def run_ha(args: argparse.Namespace) -> None:
    keys = parse_keys(args.sa)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.listen, args.port))
    tun = None
    tun_fd = None
    if args.tunnel:
        # what an HA does for an MN away from home: packets routed to its home address
        # (here by a route on the CN, standing in for proxy ARP) are tunnelled IP-in-IP to
        # the care-of address; reverse-tunnelled packets (T bit) come back IP-in-IP.
        tun = socket.socket(socket.AF_INET, socket.SOCK_RAW, 4)
        tun_fd, tun_name = open_tun("hatun%d", None, [])
    bindings: dict[str, str] = {}  # home address -> care-of address
    log = open(args.log, "a", buffering=1) if args.log else None
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    print(json.dumps({"ready": True}), flush=True)
    while not stop:
        socks = [sock] + ([tun, tun_fd] if tun else [])
        try:
            readable, _, _ = select.select(socks, [], [], 0.2)
        except InterruptedError:
            continue
        if tun is not None and tun in readable:
            # reverse tunnel from the proxy: deliver the inner packet (forwarding)
            pkt, _src = tun.recvfrom(65535)
            inner = pkt[(pkt[0] & 0x0F) * 4:]
            os.write(tun_fd, inner)
            if log:
                log.write(json.dumps({"reverse_tunnel_rx": len(inner)}) + "\n")
        if tun_fd is not None and tun_fd in readable:
            while True:
                try:
                    pkt = os.read(tun_fd, 65535)
                except BlockingIOError:
                    break
                coa = bindings.get(socket.inet_ntoa(pkt[16:20]))
                if coa is not None:
                    tun.sendto(pkt, (coa, 0))  # the kernel adds the outer header, protocol 4
        if sock not in readable:
            continue
        data, src = sock.recvfrom(65535)
        try:
            req = parse(data, keys)
        except Exception as e:
            req = {"error": str(e), "hex": data.hex()}
        req["src"] = list(src)
        if log:
            log.write(json.dumps(req) + "\n")
        if req.get("type") != 1 or args.silent:
            continue
        code = args.code if req["auth_ok"] else 131
        home = req["home"]
        if home == "0.0.0.0" and args.assign_home:
            home = args.assign_home
        if args.reply_home is not None:
            home = args.reply_home
        exts = b""
        for t, body in req["exts"]:
            if t == EXT_NAI and not args.omit_nai:
                exts += ext(t, bytes.fromhex(body))
        lifetime = min(req["lifetime"], args.max_lifetime) if code < 64 else 0
        ha_field = args.reply_ha if args.reply_ha is not None else args.listen
        msg = reply_bytes(code, lifetime, home, ha_field, req["id"], exts)
        if req["spi"] in keys:
            msg = with_auth(msg, req["spi"], keys[req["spi"]], corrupt=args.corrupt_reply)
        if code < 64 and lifetime:
            if tun_fd is not None and home not in bindings:
                subprocess.run(["ip", "route", "replace", f"{home}/32", "dev", tun_name], check=True)
            bindings[home] = req["coa"]
        elif code < 64 and home in bindings:
            del bindings[home]
            if tun_fd is not None:
                subprocess.run(["ip", "route", "del", f"{home}/32", "dev", tun_name], check=False)
        sock.sendto(msg, src)


# ----------------------------------------------------------------------------- MN
def run_mn(args: argparse.Namespace) -> None:
    key = bytes.fromhex(args.key.removeprefix("0x"))
    flags = 0
    for ch in args.flags:
        flags |= FLAGS[ch]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if args.bind:
        sock.bind((args.bind, args.sport))
    sock.connect((args.proxy, args.port))
    coa = args.coa or sock.getsockname()[0]
    ident = int(args.ident, 0) if args.ident else ntp_identification(offset=args.clock_offset)
    exts = b""
    if args.nai:
        exts += nai_ext(args.nai)
    if args.ha_param is not None:
        exts += ha_parameter(args.ha_param, args.ha_param_type, args.ha_param_subtype)
    if args.udp_tunnel:
        exts += udp_tunnel_request(force=args.force, encap=args.udp_encap)
    for raw in args.raw_ext or []:
        exts += bytes.fromhex(raw)
    msg = request_bytes(flags, args.lifetime, args.home, args.proxy if args.ha_field is None
                        else args.ha_field, coa, ident, exts)
    if not args.no_auth:
        msg = with_auth(msg, args.spi, key, corrupt=args.bad_auth)
    if args.after_auth:
        msg += bytes.fromhex(args.after_auth)
    keys = {args.spi: key}
    out = {"request": msg.hex(), "identification": ident, "replies": []}
    for _ in range(2 if args.replay else 1):
        sock.send(msg)
        sock.settimeout(args.timeout)
        try:
            data = sock.recv(65535)
        except TimeoutError:
            out["replies"].append(None)
            continue
        out["replies"].append(parse(data, keys))
    if args.data:
        out["data"] = tunnel_data(args, sock)
    if args.tun:
        print(json.dumps(out), flush=True)
        run_mn_tunnel(args, sock, key, flags, exts)
        return
    print(json.dumps(out))


def run_mn_tunnel(args: argparse.Namespace, sock: socket.socket, key: bytes, flags: int,
                  exts: bytes) -> None:
    """The MN's side of the tunnel, until SIGTERM: packets routed into a TUN holding the home
    address (``--route``: the VPN gateway) go to the proxy in RFC 3519 tunnel data
    (``--udp-tunnel``) or IP-in-IP; what the proxy tunnels back is written to the TUN.

    SIGUSR1 moves the MN (draft §5.5): it re-reads ``--move-file`` (JSON: ``bind`` address),
    opens a new socket from there and registers again with the new care-of address; the
    tunnel follows the new registration."""
    fd, _name = open_tun("miptun%d", args.home, args.route)
    sock.setblocking(False)
    udp = args.udp_tunnel
    raw = None if udp else socket.socket(socket.AF_INET, socket.SOCK_RAW, 4)
    stop: list[int] = []
    move: list[int] = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    signal.signal(signal.SIGUSR1, lambda *a: move.append(1))
    counts = {"to_proxy": 0, "from_proxy": 0, "registrations": 1}
    while not stop:
        if move:
            move.clear()
            spec = json.loads(open(args.move_file).read())
            sock.close()
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((spec["bind"], 0))
            sock.connect((args.proxy, args.port))
            coa = sock.getsockname()[0]
            msg = with_auth(request_bytes(flags, args.lifetime, args.home, args.proxy, coa,
                                          ntp_identification(), exts), args.spi, key)
            sock.send(msg)
            sock.settimeout(3)
            while True:
                data = sock.recv(65535)
                if data[:2] == b"\x04\x04":
                    # tunnel data the proxy sent to the new care-of address ahead of its reply
                    # (a transfer under way: CI 2026-12-06 read one as the reply)
                    counts["from_proxy"] += 1
                    os.write(fd, data[4:])
                    continue
                reply = parse(data, {args.spi: key})
                if reply["type"] == 3:
                    break
            sock.setblocking(False)
            counts["registrations"] += 1
            counts["last_code"] = reply["code"]
            print(json.dumps({"moved": coa, "reply": reply}), flush=True)
        rl = [fd, sock] + ([raw] if raw else [])
        try:
            readable, _, _ = select.select(rl, [], [], 0.2)
        except InterruptedError:
            continue
        if fd in readable:
            while True:
                try:
                    pkt = os.read(fd, 65535)
                except BlockingIOError:
                    break
                if pkt[0] >> 4 != 4:
                    continue
                counts["to_proxy"] += 1
                if udp:
                    sock.send(bytes([4, 4, 0, 0]) + pkt)
                else:
                    raw.sendto(pkt, (args.proxy, 0))
        if sock in readable:
            try:
                data = sock.recv(65535)
            except (BlockingIOError, ConnectionRefusedError):
                data = b""
            if data[:2] == b"\x04\x04":
                counts["from_proxy"] += 1
                os.write(fd, data[4:])
        if raw is not None and raw in readable:
            pkt, (src, _) = raw.recvfrom(65535)
            if src == args.proxy:
                counts["from_proxy"] += 1
                os.write(fd, pkt[(pkt[0] & 0x0F) * 4:])
    if args.stats_file:
        with open(args.stats_file, "w") as f:
            json.dump(counts, f)


def esp_packet(src: str, dst: str, spi: int, seq: int, size: int) -> bytes:
    """An IPv4 packet carrying ESP-shaped bytes (SPI, sequence number, filler): the proxy
    only looks at the protocol number, never inside ESP."""
    body = struct.pack("!II", spi, seq) + bytes((seq + i) & 0xFF for i in range(size))
    return bytes(IP(src=src, dst=dst, proto=50, id=seq) / Raw(body))


def ones_complement(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def minimal_forwarding(inner: bytes, outer_src: str) -> bytes:
    """RFC 2004 §3: the minimal forwarding header (original protocol, S bit, checksum,
    original destination, original source when it is not the encapsulator) followed by the
    inner packet's payload; the outer header is the kernel's (a raw socket, protocol 55)."""
    ihl = (inner[0] & 0x0F) * 4
    s_bit = inner[12:16] != socket.inet_aton(outer_src)
    mh = bytes([inner[9], 0x80 if s_bit else 0, 0, 0]) + inner[16:20] + (inner[12:16] if s_bit else b"")
    c = ones_complement(mh)
    return mh[:2] + struct.pack("!H", c) + mh[4:] + inner[ihl:]


def minimal_fields(mh: bytes, outer_src: str) -> dict:
    """RFC 2004 §3 read back: the forwarding header (checksum checked) and the payload after
    it; the original source is ``outer_src`` unless the S bit carries it."""
    s_bit = bool(mh[1] & 0x80)
    n = 12 if s_bit else 8
    assert ones_complement(mh[:n]) == 0, "bad minimal forwarding header checksum"
    return {"proto": mh[0], "dst": socket.inet_ntoa(mh[4:8]),
            "src": socket.inet_ntoa(mh[8:12]) if s_bit else outer_src, "s_bit": s_bit,
            "payload": mh[n:].hex()}


def from_minimal(pkt: bytes) -> dict:
    hl = (pkt[0] & 0x0F) * 4
    return {"outer": "minimal", "outer_src": socket.inet_ntoa(pkt[12:16]),
            "outer_dst": socket.inet_ntoa(pkt[16:20]),
            **minimal_fields(pkt[hl:], socket.inet_ntoa(pkt[12:16]))}


def udp_tunnel_body(nh: int, inner: bytes, encapsulator: str) -> bytes:
    """RFC 3519 tunnel data (type 4, next header ``nh``, reserved 0) carrying ``inner``:
    the IP packet itself (4), a GRE header first (47), or minimal encapsulation's
    forwarding header and the payload (55), the UDP datagram's IP header standing for
    the outer header RFC 2004 would rewrite."""
    if nh == 4:
        body = inner
    elif nh == 47:
        body = bytes(GRE(proto=0x0800)) + inner
    elif nh == 55:
        body = minimal_forwarding(inner, encapsulator)
    else:
        body = inner
    return bytes([4, nh, 0, 0]) + body


def from_udp_tunnel(data: bytes, outer_src: str) -> dict:
    """Tunnel data read back, whatever its next header: the inner packet's fields."""
    nh = data[1]
    if nh == 55:
        return {"outer": "udp", "nh": nh, **minimal_fields(data[4:], outer_src)}
    body = data[4:]
    if nh == 47:
        g = GRE(body)
        assert g.proto == 0x0800 and g.chksum_present == 0, g.summary()
        body = bytes(g.payload)
    pkt = IP(body)
    return {"outer": "udp", "nh": nh, "src": pkt.src, "dst": pkt.dst, "proto": pkt.proto,
            "payload": bytes(pkt.payload).hex()}


def plain_data(args: argparse.Namespace) -> dict:
    """An MN behind a foreign agent (home address on one of its interfaces): ESP packets
    from the home address to ``--gateway``, sent plainly to the default router (the FA
    reverse-tunnels them), and the ESP that comes back to the home address."""
    tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
    for seq in range(1, args.data + 1):
        tx.sendto(esp_packet(args.home, args.gateway, 0x5000, seq, args.size), (args.gateway, 0))
        time.sleep(args.interval)
    got = []
    deadline = time.monotonic() + args.timeout
    while len(got) < args.expect and time.monotonic() < deadline:
        rx.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            pkt = IP(rx.recv(65535))
        except TimeoutError:
            break
        got.append({"outer": "plain", "src": pkt.src, "dst": pkt.dst, "proto": pkt.proto,
                    "payload": bytes(pkt.payload).hex()})
    return {"sent": args.data, "received": got}


def tunnel_data(args: argparse.Namespace, sock: socket.socket) -> dict:
    """Send ``--data`` ESP packets from the home address to ``--gateway`` through the
    tunnel (RFC 3519 UDP tunnel data with ``--udp-tunnel``, else IP-in-IP or GRE with
    ``--flags G`` on a raw socket) and collect what the proxy tunnels back."""
    if args.via_fa:
        return plain_data(args)
    udp = args.udp_tunnel
    gre = "G" in args.flags
    minimal = "M" in args.flags
    raw_tx = raw_rx = None
    if not udp:
        proto = 47 if gre else 55 if minimal else 4
        raw_rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
        raw_tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
    sent = []
    for seq in range(1, args.data + 1):
        inner = esp_packet(args.home, args.gateway, 0x5000, seq, args.size)
        sent.append(inner)
        if udp:
            sock.send(udp_tunnel_body(args.udp_encap, inner, sock.getsockname()[0]))
        elif gre:
            raw_tx.sendto(bytes(GRE(proto=0x0800)) + inner, (args.proxy, 0))
        elif minimal:
            coa = args.coa or sock.getsockname()[0]
            raw_tx.sendto(minimal_forwarding(inner, coa), (args.proxy, 0))
        else:
            raw_tx.sendto(inner, (args.proxy, 0))
        time.sleep(args.interval)
    got = []
    deadline = time.monotonic() + args.timeout
    src = sock if udp else raw_rx
    while len(got) < args.expect and time.monotonic() < deadline:
        src.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = src.recv(65535)
        except TimeoutError:
            break
        if udp:
            if data[:1] != b"\x04":
                continue
            got.append(from_udp_tunnel(data, args.proxy))
        elif minimal:
            got.append(from_minimal(data))
        else:
            outer = IP(data)
            inner = outer.payload
            if isinstance(inner, GRE):
                inner = inner.payload
            got.append({"outer": "gre" if gre else "ipip", "outer_src": outer.src,
                        "outer_dst": outer.dst, "src": inner.src, "dst": inner.dst,
                        "proto": inner.proto, "payload": bytes(inner.payload).hex()})
    return {"sent": len(sent), "received": got}


# ------------------------------------------------------------------- gateway stand-in
def run_gw(args: argparse.Namespace) -> None:
    """A stand-in VPN gateway for the proxy's two-box tests: every ESP packet it gets is
    answered by an ESP packet with the same bytes, back to the sender (which is the MN's
    home address, routed through the proxy)."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
    rx.bind((args.listen, 0))
    log = open(args.log, "a", buffering=1) if args.log else None
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    print(json.dumps({"ready": True}), flush=True)
    while not stop:
        try:
            readable, _, _ = select.select([rx], [], [], 0.2)
        except InterruptedError:
            continue
        if not readable:
            continue
        pkt, (src, _) = rx.recvfrom(65535)
        hl = (pkt[0] & 0x0F) * 4
        if log:
            log.write(json.dumps({"esp_from": src, "len": len(pkt), "payload": pkt[hl:].hex()}) + "\n")
        rx.sendto(pkt[hl:], (src, 0))


# ----------------------------------------------------------------------------- FA
def run_fa(args: argparse.Namespace) -> None:
    """A foreign agent (RFC 5944 3.7, RFC 3024 direct delivery), until SIGTERM.

    Requests from visiting MNs on ``--mn-side``:434 are relayed to the home agent field's
    address from ``--source``:434 (not the care-of address: the HA must not take the
    difference for a NAT), cut after the MN-HA extension and with the FA-HA authenticator
    appended (``--sa``); replies are checked for the FA-HA authenticator after the MN-HA
    one, relayed without it to the MN, and an accepted one adds the MN to the visitor list
    (a host route to its home address on ``--mn-if``).  IP-in-IP to the care-of address is
    decapsulated and delivered to visitors; what a visitor sends from its home address is
    reverse-tunnelled from the care-of address to the home agent field (RFC 3024 5.2).
    The tunnel both ways is the one the MN asked for in its request's flags (RFC 5944
    3.3, 4.1): IP-in-IP, GRE (G) or minimal encapsulation (M, RFC 2004).
    One JSON line per event on ``--log``."""
    fa_spi, fa_key = int(args.spi), bytes.fromhex(args.key.removeprefix("0x"))
    mn_side = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    mn_side.bind((args.mn_side, 434))
    ha_side = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ha_side.bind((args.source, 434))
    # one raw socket per tunnel protocol each way: IP-in-IP 4, GRE 47, minimal 55
    rx = {proto: socket.socket(socket.AF_INET, socket.SOCK_RAW, proto) for proto in (4, 47, 55)}
    tx = {proto: socket.socket(socket.AF_INET, socket.SOCK_RAW, proto) for proto in (4, 47, 55)}
    for t in tx.values():
        t.bind((args.coa, 0))
    deliver = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sniff = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
    sniff.bind((args.mn_if, 0x0800))
    log = open(args.log, "a", buffering=1) if args.log else None
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    pending: dict[int, tuple[tuple[str, int], int]] = {}  # identification -> (MN, its flags)
    #: home address -> (home agent field: the tunnel's other end, tunnel protocol, inside
    #: RFC 3519 UDP tunnel data on the relaying socket rather than on a raw socket)
    visitors: dict[str, tuple[str, int, bool]] = {}
    fa_exts = udp_tunnel_request(force=args.force, encap=args.udp_encap) if args.udp_tunnel else b""
    counts = {"tunnelled_to_ha": 0, "delivered_to_mn": 0}

    def note(**kw: object) -> None:
        if log:
            log.write(json.dumps(kw) + "\n")

    print("ready", flush=True)
    while not stop:
        try:
            readable, _, _ = select.select([mn_side, ha_side, *rx.values(), sniff], [], [], 0.2)
        except InterruptedError:
            continue
        if mn_side in readable:
            data, src = mn_side.recvfrom(65535)
            if data[:1] == b"\x01" and len(data) >= 24:
                r = MobileIP(data)[MobileIPRRQ]
                pending[r.id] = (src, data[1])
                out = fa_relay_request(data, fa_spi if not args.no_fa_ha else None, fa_key,
                                       corrupt=args.corrupt, fa_exts=fa_exts)
                ha_side.sendto(out, (r.haaddr, 434))
                note(relayed=out.hex(), mn=src[0], ha=r.haaddr)
        if ha_side in readable:
            data, src = ha_side.recvfrom(65535)
            if data[:1] == b"\x03" and len(data) >= 20:
                ok, for_mn = fa_check_reply(data, fa_spi, fa_key)
                r = MobileIP(data)[MobileIPRRP]
                utr = fa_udp_tunnel_reply(data) if ok else None
                note(reply=data.hex(), fa_ha_ok=ok, code=r.code, src=src[0], udp_tunnel_reply=utr)
                mn = pending.pop(r.id, None)
                if ok and mn is not None:
                    dst, flags = mn
                    if r.code < 64 and r.lifetime:
                        if utr is not None and utr["code"] == 0:  # RFC 3519: UDP, our encap
                            visitors[r.homeaddr] = (src[0], args.udp_encap, True)
                        else:
                            visitors[r.homeaddr] = (src[0], 47 if flags & FLAGS["G"] else
                                                    55 if flags & FLAGS["M"] else 4, False)
                        subprocess.run(["ip", "route", "replace", f"{r.homeaddr}/32", "dev",
                                        args.mn_if], check=True)
                    mn_side.sendto(for_mn, dst)
            elif data[:1] == b"\x04" and len(data) > 4:  # RFC 3519 tunnel data for a visitor
                inner = fa_decapsulate_udp(data, src[0])
                home = socket.inet_ntoa(inner[16:20]) if inner and len(inner) >= 20 else ""
                if home in visitors and visitors[home][2] and visitors[home][1] == data[1]:
                    deliver.sendto(inner, (home, 0))
                    counts["delivered_to_mn"] += 1
                    key = f"delivered_udp_{data[1]}"
                    counts[key] = counts.get(key, 0) + 1
        for proto, sock in rx.items():
            if sock not in readable:
                continue
            pkt, (src, _) = sock.recvfrom(65535)
            if pkt[16:20] != socket.inet_aton(args.coa):
                continue
            inner = fa_decapsulate(proto, pkt)
            if inner is None or len(inner) < 20:
                continue
            home = socket.inet_ntoa(inner[16:20])
            if home in visitors and visitors[home][1:] == (proto, False):
                deliver.sendto(inner, (home, 0))
                counts["delivered_to_mn"] += 1
                counts[f"delivered_proto_{proto}"] = counts.get(f"delivered_proto_{proto}", 0) + 1
        if sniff in readable:
            pkt, addr = sniff.recvfrom(65535)
            if addr[2] != socket.PACKET_OUTGOING and len(pkt) >= 20:
                home = socket.inet_ntoa(pkt[12:16])
                if home in visitors:
                    ha, proto, udp = visitors[home]
                    if udp:
                        ha_side.sendto(udp_tunnel_body(proto, pkt, args.source), (ha, 434))
                    else:
                        body = (bytes(GRE(proto=0x0800)) + pkt if proto == 47 else
                                minimal_forwarding(pkt, args.coa) if proto == 55 else pkt)
                        tx[proto].sendto(body, (ha, 0))
                    counts["tunnelled_to_ha"] += 1
    note(**counts)


def fa_decapsulate_udp(data: bytes, sender: str) -> bytes | None:
    """The inner packet of RFC 3519 tunnel data (type 4): next header 4 is the packet
    itself, 47 a GRE header first, 55 minimal encapsulation's forwarding header, whose
    outer header is the UDP datagram's (the sender's address is the original source
    unless the S bit carries one)."""
    nh, body = data[1], data[4:]
    if nh == 4:
        return body
    if nh == 47:
        g = GRE(body)
        return bytes(g.payload) if g.proto == 0x0800 else None
    if nh == 55:
        f = minimal_fields(body, sender)
        return bytes(IP(src=f["src"], dst=f["dst"], proto=f["proto"]) /
                     Raw(bytes.fromhex(f["payload"])))
    return None


def fa_decapsulate(proto: int, pkt: bytes) -> bytes | None:
    """The inner packet of what the home agent's side tunnelled to the FA's care-of
    address: IP-in-IP (RFC 2003), GRE (RFC 2784, IPv4 payload only), or minimal
    encapsulation (RFC 2004 §3: the inner header rebuilt from the outer one and the
    forwarding header, its checksum recomputed by scapy)."""
    hl = (pkt[0] & 0x0F) * 4
    if proto == 4:
        return pkt[hl:]
    if proto == 47:
        g = GRE(pkt[hl:])
        return bytes(g.payload) if g.proto == 0x0800 else None
    outer = IP(pkt)
    f = minimal_fields(pkt[hl:], outer.src)
    inner = IP(src=f["src"], dst=f["dst"], proto=f["proto"], ttl=outer.ttl, id=outer.id) / \
        Raw(bytes.fromhex(f["payload"]))
    return bytes(inner)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("ha")
    h.add_argument("--listen", required=True)
    h.add_argument("--port", type=int, default=434)
    h.add_argument("--sa", action="append", help="SPI:HEXKEY (repeat)")
    h.add_argument("--code", type=int, default=0)
    h.add_argument("--max-lifetime", type=int, default=600)
    h.add_argument("--assign-home", default="")
    h.add_argument("--reply-home", default=None)
    h.add_argument("--reply-ha", default=None)
    h.add_argument("--omit-nai", action="store_true")
    h.add_argument("--corrupt-reply", action="store_true")
    h.add_argument("--silent", action="store_true", help="log requests, never answer")
    h.add_argument("--tunnel", action="store_true")
    h.add_argument("--log")
    m = sub.add_parser("mn")
    m.add_argument("--proxy", required=True)
    m.add_argument("--port", type=int, default=434)
    m.add_argument("--bind", default="")
    m.add_argument("--sport", type=int, default=0)
    m.add_argument("--home", required=True)
    m.add_argument("--coa", default="")
    m.add_argument("--ha-field", default=None, help="the request's home agent field (default: --proxy)")
    m.add_argument("--ha-param", default=None, help="HA Parameter extension address (omit: none)")
    m.add_argument("--ha-param-type", type=int, default=127)
    m.add_argument("--ha-param-subtype", type=int, default=0)
    m.add_argument("--nai", default="")
    m.add_argument("--udp-tunnel", action="store_true")
    m.add_argument("--force", action="store_true")
    m.add_argument("--udp-encap", type=int, default=4,
                   help="UDP Tunnel Request encapsulation and tunnel data next header (4, 47, 55)")
    m.add_argument("--spi", type=int, required=True)
    m.add_argument("--key", required=True)
    m.add_argument("--flags", default="T")
    m.add_argument("--lifetime", type=int, default=300)
    m.add_argument("--ident", default="")
    m.add_argument("--clock-offset", type=float, default=0.0)
    m.add_argument("--bad-auth", action="store_true")
    m.add_argument("--no-auth", action="store_true")
    m.add_argument("--raw-ext", action="append")
    m.add_argument("--after-auth", default="", help="hex bytes appended after the authenticator")
    m.add_argument("--replay", action="store_true")
    m.add_argument("--timeout", type=float, default=3.0)
    m.add_argument("--data", type=int, default=0, help="ESP packets to send after registering")
    m.add_argument("--expect", type=int, default=0, help="packets to wait for in return")
    m.add_argument("--gateway", default="", help="inner destination (the VPN gateway)")
    m.add_argument("--size", type=int, default=56)
    m.add_argument("--interval", type=float, default=0.02)
    m.add_argument("--tun", action="store_true", help="then run the MN's tunnel until SIGTERM")
    m.add_argument("--route", action="append", default=[], help="into the tunnel (with --tun)")
    m.add_argument("--move-file", default="", help="JSON {bind: address} read on SIGUSR1")
    m.add_argument("--stats-file", default="")
    m.add_argument("--via-fa", action="store_true",
                   help="--data sent plainly from the home address (the FA tunnels it)")
    f = sub.add_parser("fa")
    f.add_argument("--mn-side", required=True, help="the FA's address on the MNs' link")
    f.add_argument("--mn-if", required=True)
    f.add_argument("--source", required=True, help="address the FA relays requests from")
    f.add_argument("--coa", required=True, help="the FA's care-of address (tunnel endpoint)")
    f.add_argument("--spi", required=True)
    f.add_argument("--key", required=True)
    f.add_argument("--no-fa-ha", action="store_true")
    f.add_argument("--udp-tunnel", action="store_true",
                   help="add the FA's own UDP Tunnel Request (RFC 3519 3.1) to what it relays")
    f.add_argument("--force", action="store_true", help="with --udp-tunnel: the F bit")
    f.add_argument("--udp-encap", type=int, default=4, help="with --udp-tunnel: 4, 47 or 55")
    f.add_argument("--corrupt", action="store_true")
    f.add_argument("--log")
    g = sub.add_parser("gw")
    g.add_argument("--listen", required=True)
    g.add_argument("--log")
    args = p.parse_args(argv)
    if args.cmd == "ha":
        run_ha(args)
    elif args.cmd == "gw":
        run_gw(args)
    elif args.cmd == "fa":
        run_fa(args)
    else:
        run_mn(args)


if __name__ == "__main__":
    sys.exit(main())
