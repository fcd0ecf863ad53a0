#!/usr/bin/env python3
"""An independent, static-keyed ESP-in-UDP (RFC 3948) peer for narsuite's integration tests.

narsuite's ``esp`` role is an ESP-in-UDP gateway.  Its tests need a peer that
shares no code with it, so that a bug in narsuite's ESP codec cannot hide
behind the same bug in the test peer.  This program is that peer:

* the ESP transforms are scapy's ``SecurityAssociation`` (scapy/layers/ipsec.py),
  not narsuite code (nothing here imports ``narsuite``);
* the tunnel is a TUN device opened here with ``TUNSETIFF`` and configured with
  ``ip`` commands; the UDP socket is a plain bound socket, so a NAT in front of
  the peer sees an ordinary UDP flow and rewrites its source port.

Receive path (one UDP datagram from the peer): a lone 0xFF byte is a NAT-keepalive
(counted, dropped); four zero bytes in front are the non-ESP marker of IKE
(counted, dropped); anything else is ESP: SPI check, anti-replay window check,
integrity check and decryption with the inbound SA, then the inner IPv4 packet
goes to the TUN (tunnel mode) or the transport payload goes to the built-in UDP
echo (transport mode).  Send path: IPv4 packets read from the TUN (or made by the
transport-mode traffic generator) are encrypted with the outbound SA, which
builds the whole RFC 3948 packet (IP / UDP(nat_t_header) / ESP); the IP and UDP
headers are cut off and only the ESP part is sent through the UDP socket, which
adds its own UDP header.

Run ``python3 tests/esp_peer.py --help``; docs/esp-peer.md explains the options
and what the peer does and does not prove.  It prints ``READY`` on stdout once the
socket (and TUN) are up; SIGUSR1 writes the counters to ``--stats-file``
(JSON, replaced atomically), and so does the exit on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time

# Linux <linux/if_tun.h>
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000

KEEPALIVE = b"\xff"  # RFC 3948 section 2.3
NON_ESP_MARKER = b"\x00\x00\x00\x00"  # RFC 3948 section 2.2

# our option name -> (scapy CRYPT_ALGOS name, allowed key lengths in bytes, salt included)
ENC_ALGOS = {
    "aes-gcm-16": ("AES-GCM", (16 + 4, 24 + 4, 32 + 4)),  # RFC 4106: key || 4-byte salt
    "aes-cbc": ("AES-CBC", (16, 24, 32)),
    "null": ("NULL", (0,)),
}
# our option name -> (scapy AUTH_ALGOS name, ICV length)
INTEG_ALGOS = {
    "hmac-sha1-96": ("HMAC-SHA1-96", 12),
    "hmac-sha256-128": ("SHA2-256-128", 16),
    "none": (None, 0),
}

COUNTERS = (
    "udp_rx",                  # every datagram received on the socket
    "esp_rx",                  # ESP packets that passed SPI, replay and integrity checks
    "esp_tx",                  # ESP packets sent
    "decrypt_failures",        # integrity/decryption failed (wrong key, corrupted, truncated)
    "spi_unknown",             # ESP whose SPI is not --spi-in
    "replay_drops",            # sequence number already seen or left of the window
    "short_rx",                # datagrams too short to be ESP (and not a keepalive)
    "keepalives_rx",
    "keepalives_tx",
    "non_esp_marker_rx",       # IKE (non-ESP marker) datagrams seen on this port
    "from_unknown_peer",       # authenticated ESP from an address other than the peer's
    "peer_changes",            # --learn-peer: the peer address/port was (re)learnt
    "tun_rx",                  # packets read from the TUN
    "tun_tx",                  # decrypted packets written to the TUN
    "tun_not_ipv4",            # non-IPv4 packets read from the TUN (dropped)
    "inner_dropped",           # decrypted payloads not deliverable (not IPv4, dummy, ...)
    "tx_no_peer",              # packets dropped because no peer is known yet
    "send_errors",             # sendto() failed
    "transport_udp_rx",        # transport mode: UDP payloads received inside ESP
    "transport_udp_tx",        # transport mode: UDP payloads sent inside ESP
    "echo_replies_sent",       # --transport-udp-echo answers
    "echo_replies_rx",         # answers to --transport-send
)


class ConfigError(Exception):
    """A bad option: the message names the option, the value and what is expected."""


# ---------------------------------------------------------------- option parsing


def parse_int(text: str) -> int:
    """SPI/number: ``0x`` prefix for hex, otherwise decimal."""
    return int(text, 0)


def parse_hex(option: str, text: str | None) -> bytes:
    if text is None:
        return b""
    t = text.strip().lower()
    if t.startswith("0x"):
        t = t[2:]
    t = t.replace(":", "").replace(" ", "")
    try:
        return bytes.fromhex(t)
    except ValueError:
        raise ConfigError(f"{option}={text!r} is not hex (e.g. 0x00112233...)") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="esp_peer.py",
        description="Static-keyed ESP-in-UDP (RFC 3948) peer built on scapy, for tests.")
    p.add_argument("--gateway", help="peer's IPv4 address (required unless --learn-peer)")
    p.add_argument("--gateway-port", type=int, default=4500, help="peer's UDP port (4500)")
    p.add_argument("--local-port", type=int, default=4500,
                   help="UDP port bound on 0.0.0.0 (4500); a NAT may rewrite it")
    p.add_argument("--learn-peer", action="store_true",
                   help="send to wherever authenticated ESP last came from (gateway side)")
    p.add_argument("--mode", choices=("tunnel", "transport"), default="tunnel")
    p.add_argument("--spi-out", type=parse_int, required=True, help="SPI of the outbound SA")
    p.add_argument("--spi-in", type=parse_int, required=True, help="SPI of the inbound SA")
    p.add_argument("--enc", choices=sorted(ENC_ALGOS), default="aes-gcm-16")
    p.add_argument("--enc-key-out", help="hex; for aes-gcm-16 the last 4 bytes are the salt")
    p.add_argument("--enc-key-in", help="hex; for aes-gcm-16 the last 4 bytes are the salt")
    p.add_argument("--integ", choices=sorted(INTEG_ALGOS), default="none")
    p.add_argument("--integ-key-out", help="hex")
    p.add_argument("--integ-key-in", help="hex")
    p.add_argument("--replay-window", type=int, default=64,
                   help="anti-replay window in packets (0 = no replay check)")
    # tunnel mode
    p.add_argument("--tun-name", default="esptun%d", help="TUN name (%%d: kernel picks)")
    p.add_argument("--tun-addr", help="address/prefix for the TUN, e.g. 10.8.0.2/32")
    p.add_argument("--tun-mtu", type=int, default=1400)
    p.add_argument("--route", action="append", default=[],
                   help="prefix routed into the TUN (repeatable)")
    p.add_argument("--tunnel-src",
                   help="our own address in the outer/transport IP header "
                        "(default: the source address the kernel picks towards the peer)")
    # transport mode
    p.add_argument("--transport-udp-echo", type=int, metavar="PORT",
                   help="transport mode: answer UDP to PORT inside ESP with the same payload")
    p.add_argument("--transport-send", metavar="HOST:PORT:TEXT",
                   help="transport mode: send TEXT in UDP to HOST:PORT inside ESP, repeated "
                        "every --transport-interval s until an answer comes back")
    p.add_argument("--transport-src-port", type=int, default=34567,
                   help="inner UDP source port for --transport-send")
    p.add_argument("--transport-interval", type=float, default=1.0)
    p.add_argument("--transport-count", type=int, default=5,
                   help="at most this many --transport-send datagrams")
    # misc
    p.add_argument("--keepalive", type=float, default=0.0,
                   help="send a lone 0xFF byte to the peer every SECONDS (0 = off)")
    p.add_argument("--stats-file", help="JSON counters, written on SIGUSR1 and at exit")
    p.add_argument("-v", "--verbose", action="store_true", help="log packets on stderr")
    return p


def check_config(args: argparse.Namespace) -> None:
    """Validate option combinations; raise ConfigError naming the option."""
    if not args.gateway and not args.learn_peer:
        raise ConfigError("--gateway is required unless --learn-peer is given")
    if args.gateway:
        try:
            ipaddress.IPv4Address(args.gateway)
        except ValueError:
            raise ConfigError(f"--gateway={args.gateway!r} is not an IPv4 address") from None
    for opt in ("spi_out", "spi_in"):
        v = getattr(args, opt)
        if not 256 <= v <= 0xFFFFFFFF:
            raise ConfigError(f"--{opt.replace('_', '-')}={v:#x}: SPI must be 256..0xffffffff "
                              "(0-255 are reserved, RFC 4303 section 2.1)")
    for direction in ("out", "in"):
        enc_key = parse_hex(f"--enc-key-{direction}", getattr(args, f"enc_key_{direction}"))
        _, lengths = ENC_ALGOS[args.enc]
        if len(enc_key) not in lengths:
            raise ConfigError(
                f"--enc-key-{direction}: {len(enc_key)} bytes, --enc {args.enc} needs one of "
                f"{list(lengths)} bytes" + (" (AES key followed by the 4-byte salt)"
                                            if args.enc == "aes-gcm-16" else ""))
        integ_key = parse_hex(f"--integ-key-{direction}", getattr(args, f"integ_key_{direction}"))
        if args.integ == "none" and integ_key:
            raise ConfigError(f"--integ-key-{direction} given but --integ is none")
        if args.integ != "none" and not integ_key:
            raise ConfigError(f"--integ {args.integ} needs --integ-key-{direction}")
    if args.enc == "aes-gcm-16" and args.integ != "none":
        raise ConfigError("--enc aes-gcm-16 is an AEAD: use --integ none")
    if args.enc == "null" and args.integ == "none":
        raise ConfigError("--enc null needs an --integ algorithm (RFC 4303: not both NULL)")
    if args.mode == "tunnel":
        if args.transport_udp_echo or args.transport_send:
            raise ConfigError("--transport-udp-echo/--transport-send need --mode transport")
        for r in args.route:
            try:
                ipaddress.IPv4Network(r, strict=False)
            except ValueError:
                raise ConfigError(f"--route={r!r} is not an IPv4 prefix") from None
        if args.tun_addr:
            try:
                ipaddress.IPv4Interface(args.tun_addr)
            except ValueError:
                raise ConfigError(f"--tun-addr={args.tun_addr!r} is not address/prefix") from None
    else:
        if args.route or args.tun_addr:
            raise ConfigError("--route/--tun-addr are for --mode tunnel")
        if args.transport_send:
            parts = args.transport_send.split(":", 2)
            if len(parts) != 3 or not parts[1].isdigit():
                raise ConfigError(f"--transport-send={args.transport_send!r}: use HOST:PORT:TEXT")
            if not args.gateway:
                raise ConfigError("--transport-send needs --gateway (nothing to send to yet)")
    if args.replay_window < 0:
        raise ConfigError("--replay-window must be >= 0")


# ---------------------------------------------------------------- ESP with scapy


def make_sa(spi: int, enc: str, enc_key: bytes, integ: str, integ_key: bytes,
            tunnel_header=None, nat_t_header=None):
    """A scapy SecurityAssociation for one direction.

    For aes-gcm-16 scapy itself splits enc_key into key and salt (last 4 bytes).
    ``proto`` must be the ESP class, not the string "ESP": scapy only accepts a
    nat_t_header when ``proto is ESP``.
    """
    from scapy.layers.ipsec import ESP, SecurityAssociation

    crypt_algo, _ = ENC_ALGOS[enc]
    auth_algo, _ = INTEG_ALGOS[integ]
    return SecurityAssociation(
        ESP, spi=spi,
        crypt_algo=crypt_algo, crypt_key=enc_key or None,
        auth_algo=auth_algo, auth_key=integ_key or None,
        tunnel_header=tunnel_header, nat_t_header=nat_t_header)


def strip_ip_udp(datagram: bytes) -> bytes:
    """The UDP payload (here: the ESP packet) of a raw IPv4/UDP packet."""
    if len(datagram) < 28 or datagram[0] >> 4 != 4 or datagram[9] != 17:
        raise ValueError("not an IPv4/UDP packet")
    ihl = (datagram[0] & 0x0F) * 4
    return datagram[ihl + 8:]


def encapsulate(sa, inner) -> bytes:
    """Encrypt an IPv4 packet (scapy IP or bytes) with sa; return only the ESP bytes.

    In tunnel mode ``inner`` is the whole packet to carry; in transport mode it is
    the packet whose header becomes the (stripped) outer header.  scapy returns
    IP / UDP(nat_t_header) / ESP; the kernel will add our socket's own UDP header.
    """
    from scapy.layers.inet import IP

    if isinstance(inner, (bytes, bytearray)):
        inner = IP(bytes(inner))
    return strip_ip_udp(bytes(sa.encrypt(inner)))


def decapsulate(sa, esp: bytes, src: tuple[str, int], dst: tuple[str, int]) -> tuple[int, bytes]:
    """Check and decrypt one ESP packet with sa; return (next header, payload bytes).

    The packet is rebuilt as it was on the wire (IP / UDP / ESP) for scapy.
    Raises scapy's IPSecIntegrityError on a bad ICV/tag, other exceptions on
    garbage.  In tunnel mode the payload is the inner IP packet.
    """
    from scapy.layers.inet import IP, UDP
    from scapy.layers.ipsec import ESP

    outer = IP(src=src[0], dst=dst[0]) / UDP(sport=src[1], dport=dst[1]) / ESP(esp)
    result = sa.decrypt(outer)
    if sa.tunnel_header is not None:
        # scapy dropped the payload of `outer` and stored the next header in it
        nh = outer.proto
        payload = result.original or bytes(result)  # `original`: the bytes as decrypted
    else:
        nh = result.proto
        inner = result.payload  # a copy made by `/`: its `original` is lost, rebuild it
        payload = getattr(inner, "original", b"") or bytes(inner)
    return nh, bytes(payload)


class ReplayWindow:
    """RFC 4303 section 3.4.3 sliding window (no ESN); size 0 disables it."""

    def __init__(self, size: int = 64):
        self.size = size
        self.top = 0
        self.bitmap = 0  # bit i set: top - i was received

    def check(self, seq: int) -> bool:
        if self.size == 0:
            return True
        if seq == 0:
            return False
        if seq > self.top:
            return True
        offset = self.top - seq
        if offset >= self.size:
            return False
        return not (self.bitmap >> offset) & 1

    def update(self, seq: int) -> None:
        if self.size == 0:
            return
        if seq > self.top:
            shift = seq - self.top
            self.bitmap = ((self.bitmap << shift) | 1) & ((1 << self.size) - 1)
            self.top = seq
        else:
            self.bitmap |= 1 << (self.top - seq)


def classify(datagram: bytes) -> str:
    """'keepalive', 'non-esp' (IKE behind the marker), 'short' or 'esp'."""
    if datagram == KEEPALIVE:
        return "keepalive"
    if datagram[:4] == NON_ESP_MARKER and len(datagram) >= 4:
        return "non-esp"
    if len(datagram) < 8:
        return "short"
    return "esp"


def udp_checksum(src: str, dst: str, segment: bytes) -> int:
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, len(segment))
    data = pseudo + segment
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s & 0xFFFF) or 0xFFFF


def udp_ip_packet(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """Raw IPv4/UDP packet (the transport-mode packet before ESP is inserted)."""
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    seg = seg[:6] + struct.pack("!H", udp_checksum(src, dst, seg)) + seg[8:]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(seg), 0, 0x4000, 64, 17, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr + seg  # scapy fills in the IP checksum when it rebuilds the header


# ---------------------------------------------------------------- TUN


def open_tun(name: str) -> tuple[int, str]:
    """Open a TUN device (IFF_TUN | IFF_NO_PI); return (fd, actual name)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        ifr = struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI)
        res = fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError:
        os.close(fd)
        raise
    return fd, res[:16].rstrip(b"\0").decode()


def ip_cmd(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")


def configure_tun(name: str, addr: str | None, mtu: int, routes: list[str]) -> None:
    v6 = f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6"
    if os.path.exists(v6):  # keep IPv6 router solicitations etc. out of the tunnel
        with open(v6, "w") as f:
            f.write("1")
    ip_cmd("link", "set", "dev", name, "mtu", str(mtu), "up")
    src = []
    if addr:
        ip_cmd("addr", "add", addr, "dev", name)
        src = ["src", str(ipaddress.IPv4Interface(addr).ip)]
    for r in routes:
        ip_cmd("route", "replace", str(ipaddress.IPv4Network(r, strict=False)), "dev", name, *src)


# ---------------------------------------------------------------- the peer


class Peer:
    def __init__(self, args: argparse.Namespace):
        from scapy.layers.inet import IP, UDP

        self.args = args
        self.stats = dict.fromkeys(COUNTERS, 0)
        self.stats_writes = 0
        self.peer: tuple[str, int] | None = (
            (args.gateway, args.gateway_port) if args.gateway else None)
        self._local_ip_cache: dict[str, str] = {}
        self.replay = ReplayWindow(args.replay_window)
        self.stop_requested = False
        self.dump_requested = False
        self.tun_fd: int | None = None
        self.tun_name: str | None = None
        self.sock: socket.socket | None = None
        self.echo_answered = False
        self.sends_done = 0
        self.next_send = 0.0
        self.next_keepalive = 0.0

        tunnel = args.mode == "tunnel"
        self.sa_out = make_sa(args.spi_out, args.enc, parse_hex("", args.enc_key_out),
                              args.integ, parse_hex("", args.integ_key_out),
                              tunnel_header=IP(src="0.0.0.0", dst="0.0.0.0") if tunnel else None,
                              nat_t_header=UDP(sport=args.local_port, dport=args.gateway_port))
        self.sa_in = make_sa(args.spi_in, args.enc, parse_hex("", args.enc_key_in),
                             args.integ, parse_hex("", args.integ_key_in),
                             tunnel_header=IP() if tunnel else None,
                             nat_t_header=UDP(sport=args.gateway_port, dport=args.local_port))
        if self.peer:
            self._point_sa_at(self.peer)

    # -- helpers

    def log(self, msg: str) -> None:
        if self.args.verbose:
            print(f"esp_peer[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)

    def local_ip(self, remote_ip: str) -> str:
        """Our own address towards remote_ip (--tunnel-src, or the kernel's choice)."""
        if self.args.tunnel_src:
            return self.args.tunnel_src
        if remote_ip not in self._local_ip_cache:
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                probe.connect((remote_ip, 9))
                self._local_ip_cache[remote_ip] = probe.getsockname()[0]
            except OSError:
                return "0.0.0.0"
            finally:
                probe.close()
        return self._local_ip_cache[remote_ip]

    def _point_sa_at(self, peer: tuple[str, int]) -> None:
        from scapy.layers.inet import IP, UDP

        if self.sa_out.tunnel_header is not None:
            self.sa_out.tunnel_header = IP(src=self.local_ip(peer[0]), dst=peer[0])
        self.sa_out.nat_t_header = UDP(sport=self.args.local_port, dport=peer[1])

    def write_stats(self) -> None:
        path = self.args.stats_file
        if not path:
            return
        self.stats_writes += 1
        doc = dict(self.stats)
        doc.update(
            writes=self.stats_writes, pid=os.getpid(), mode=self.args.mode,
            spi_in=f"{self.args.spi_in:#010x}", spi_out=f"{self.args.spi_out:#010x}",
            peer=f"{self.peer[0]}:{self.peer[1]}" if self.peer else None,
            tun=self.tun_name, out_seq=self.sa_out.seq_num, replay_top=self.replay.top)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        os.replace(tmp, path)

    def send_esp(self, inner) -> None:
        if self.peer is None:
            self.stats["tx_no_peer"] += 1
            return
        esp = encapsulate(self.sa_out, inner)
        try:
            self.sock.sendto(esp, self.peer)
        except OSError as exc:
            self.stats["send_errors"] += 1
            self.log(f"sendto {self.peer}: {exc}")
            return
        self.stats["esp_tx"] += 1

    def send_keepalive(self) -> None:
        if self.peer is None:
            return
        try:
            self.sock.sendto(KEEPALIVE, self.peer)
            self.stats["keepalives_tx"] += 1
        except OSError as exc:
            self.stats["send_errors"] += 1
            self.log(f"keepalive to {self.peer}: {exc}")

    # -- receive path

    def on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        self.stats["udp_rx"] += 1
        kind = classify(data)
        if kind == "keepalive":
            self.stats["keepalives_rx"] += 1
            return
        if kind == "non-esp":
            self.stats["non_esp_marker_rx"] += 1
            return
        if kind == "short":
            self.stats["short_rx"] += 1
            return
        spi, seq = struct.unpack("!II", data[:8])
        if spi != self.args.spi_in:
            self.stats["spi_unknown"] += 1
            self.log(f"unknown SPI {spi:#x} from {addr}")
            return
        if not self.replay.check(seq):
            self.stats["replay_drops"] += 1
            return
        from scapy.layers.ipsec import IPSecIntegrityError

        local = (self.local_ip(addr[0]), self.args.local_port)
        try:
            nh, payload = decapsulate(self.sa_in, data, addr, local)
        except IPSecIntegrityError:
            self.stats["decrypt_failures"] += 1
            self.log(f"integrity check failed, seq {seq} from {addr}")
            return
        except Exception as exc:  # garbage that passed no integrity check (or none configured)
            self.stats["decrypt_failures"] += 1
            self.log(f"cannot decrypt seq {seq} from {addr}: {exc!r}")
            return
        self.replay.update(seq)
        self.stats["esp_rx"] += 1
        if addr != self.peer:
            if self.args.learn_peer:
                self.stats["peer_changes"] += 1
                self.log(f"peer is now {addr[0]}:{addr[1]}")
                self.peer = addr
                self._point_sa_at(addr)
            else:
                self.stats["from_unknown_peer"] += 1
        if self.args.mode == "tunnel":
            self.deliver_tunnel(nh, payload)
        else:
            self.deliver_transport(nh, payload)

    def deliver_tunnel(self, nh: int, packet: bytes) -> None:
        if nh != 4 or len(packet) < 20 or packet[0] >> 4 != 4:  # 59 = dummy packet
            self.stats["inner_dropped"] += 1
            return
        try:
            os.write(self.tun_fd, packet)
        except OSError as exc:
            self.stats["inner_dropped"] += 1
            self.log(f"TUN write: {exc}")
            return
        self.stats["tun_tx"] += 1

    def deliver_transport(self, nh: int, segment: bytes) -> None:
        if nh != 17 or len(segment) < 8:
            self.stats["inner_dropped"] += 1
            return
        sport, dport, ulen, _csum = struct.unpack("!HHHH", segment[:8])
        # The checksum is not checked: it was computed over the sender's own
        # (pre-NAT) addresses, RFC 3948 section 3.1.2; ESP authenticates it anyway.
        if ulen < 8 or ulen > len(segment):
            self.stats["inner_dropped"] += 1
            return
        payload = segment[8:ulen]
        self.stats["transport_udp_rx"] += 1
        a = self.args
        if a.transport_udp_echo and dport == a.transport_udp_echo:
            me = self.local_ip(self.peer[0])
            self.send_esp(udp_ip_packet(me, self.peer[0], dport, sport, payload))
            self.stats["transport_udp_tx"] += 1
            self.stats["echo_replies_sent"] += 1
            self.log(f"echoed {len(payload)} bytes to port {sport}")
        elif a.transport_send and dport == a.transport_src_port:
            self.stats["echo_replies_rx"] += 1
            self.echo_answered = True
            text = payload.decode("utf-8", "replace")
            print(f"ECHO-REPLY {sport} {text}", flush=True)
        else:
            self.stats["inner_dropped"] += 1

    def transport_send(self) -> None:
        host, port, text = self.args.transport_send.split(":", 2)
        me = self.local_ip(self.peer[0])
        self.send_esp(udp_ip_packet(me, host, self.args.transport_src_port, int(port),
                                    text.encode()))
        self.stats["transport_udp_tx"] += 1
        self.sends_done += 1

    # -- main loop

    def setup(self) -> None:
        a = self.args
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", a.local_port))
        self.sock.setblocking(False)
        if a.mode == "tunnel":
            self.tun_fd, self.tun_name = open_tun(a.tun_name)
            configure_tun(self.tun_name, a.tun_addr, a.tun_mtu, a.route)
        if self.peer:  # the kernel's source address is known only now (routes are up)
            self._local_ip_cache.clear()
            self._point_sa_at(self.peer)

    def close(self) -> None:
        if self.tun_fd is not None:
            os.close(self.tun_fd)  # the device and its routes disappear with it
            self.tun_fd = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def run(self) -> None:
        a = self.args
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())

        def on_stop(signum, frame):
            self.stop_requested = True

        def on_usr1(signum, frame):
            self.dump_requested = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGUSR1, on_usr1)
        try:
            self.setup()
            print("READY", flush=True)
            self.log(f"up: mode {a.mode}, tun {self.tun_name}, peer {self.peer}")
            now = time.monotonic()
            self.next_keepalive = now + a.keepalive if a.keepalive > 0 else float("inf")
            self.next_send = now if a.transport_send else float("inf")
            while not self.stop_requested:
                now = time.monotonic()
                if now >= self.next_keepalive:
                    self.send_keepalive()
                    self.next_keepalive = now + a.keepalive
                if now >= self.next_send:
                    if self.echo_answered or self.sends_done >= a.transport_count:
                        self.next_send = float("inf")
                    else:
                        self.transport_send()
                        self.next_send = now + a.transport_interval
                deadline = min(self.next_keepalive, self.next_send)
                timeout = None if deadline == float("inf") else max(0.0, deadline - now)
                fds = [self.sock, wake_r] + ([self.tun_fd] if self.tun_fd is not None else [])
                readable, _, _ = select.select(fds, [], [], timeout)
                if wake_r in readable:
                    try:
                        while wake_r.recv(64):
                            pass
                    except BlockingIOError:
                        pass
                if self.dump_requested:
                    self.dump_requested = False
                    self.write_stats()
                if self.sock in readable:
                    for _ in range(64):
                        try:
                            data, addr = self.sock.recvfrom(65535)
                        except BlockingIOError:
                            break
                        except OSError as exc:  # e.g. ICMP port unreachable reported late
                            self.log(f"recvfrom: {exc}")
                            break
                        self.on_datagram(data, addr)
                if self.tun_fd is not None and self.tun_fd in readable:
                    for _ in range(64):
                        try:
                            pkt = os.read(self.tun_fd, 65535)
                        except BlockingIOError:
                            break
                        self.stats["tun_rx"] += 1
                        if not pkt or pkt[0] >> 4 != 4:
                            self.stats["tun_not_ipv4"] += 1
                            continue
                        self.send_esp(pkt)
        finally:
            signal.set_wakeup_fd(-1)
            self.close()
            self.write_stats()
            wake_r.close()
            wake_w.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_config(args)
        peer = Peer(args)
        peer.run()
    except (ConfigError, OSError) as exc:
        print(f"esp_peer: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
