"""The kernel fast path of UDP ASSOCIATE: a tc program relays a flow's datagrams after its first few.

Why: per round trip the Python relay does recvfrom+sendto twice, and more than half of
that cost is the kernel waking the process (docs/bench-socks.md).  Once the first
datagrams of an (association, IPv4 destination) flow have passed :class:`_UdpRelay` and
its rule check (``_UdpRelay.OFFLOAD_AFTER``, 4, counted both ways: a one-shot datagram or a
query and its answer is not worth two route lookups and two map updates on the reactor),
:class:`UdpOffload` installs two map entries (at most ``installs_per_second``; over it the
flow is deferred) and the tc program on the
ingress of the interfaces the flow's datagrams arrive on relays the rest itself:

* client -> relay ``[00 00 00 01 DST.ADDR DST.PORT] data`` becomes relay -> DST ``data``
  (forward map, keyed by client ip/port, relay ip/port, DST ip/port);
* DST -> relay ``data`` becomes relay -> client ``[00 00 00 01 DST] data`` (reverse map,
  keyed by DST ip/port and the relay's ip/port towards DST).

The program (:func:`build_program`) strips or prepends the 10-byte header with
``bpf_skb_adjust_room`` (at the network header), writes new IPv4 and UDP headers (TTL
64, the IPv4 checksum computed, the UDP checksum updated incrementally: correct for a
datagram that carries a full checksum; a zero checksum stays zero), and then either
passes it on up the stack (``TC_ACT_OK``) when client and DST are both local (on ``lo``, where
the sender's route is still attached), the socket being found by the new header, or hands it
to ``bpf_redirect_neigh`` towards the route's interface (the kernel does the FIB and neighbour
lookups).  A flow with one local end and one remote stays in Python: the rewritten datagram
would come in from a non-``lo`` interface with one of our addresses as its source, a martian
(and 127.0.0.0/8 is a martian even through a redirect to ``lo``'s ingress).  Link, address and
route changes (rtnetlink) make the controller take out the flows whose routes moved; where
IPv4 forwarding is on, the program also asks ``bpf_fib_lookup`` per datagram (restricted to the
flow's interface, with the source the route picks) and leaves a moved one to Python.

Only plain cases take the fast path: IPv4 without options, not a fragment, UDP, not GSO, FRAG 0 and ATYP 1, a
forward payload of 10 bytes or more, a result within the egress MTU.  Everything else,
and every miss, returns ``TCX_NEXT`` with the packet untouched: the Python path (and any
other worker's program) sees it.  Nothing is dropped by the program.

A datagram a local sender handed over with ``CHECKSUM_PARTIAL`` (loopback, a veth with
checksum offload) holds only the pseudo-header sum in its checksum field, and the socket
buffer records where the sum is to start; ``adjust_room`` moves the headers but not that
record.  Such a datagram takes the fast path only when it is delivered locally: the program
sums its payload (up to ``MAX_SUMMED`` bytes) and writes a full checksum, which the local
receiver verifies when the stale record says so (after shrinking) and ignores otherwise.
Towards another interface it goes to Python (counted per flow as ``slow``): the device, or
any device the same buffer reaches later (a veth does not copy it), would finish the sum at
the stale place, inside the IPv4 or SOCKS header (a known limit: cilium/ebpf#339).  A
datagram is taken for partial when its checksum field equals its pseudo-header sum; a full
checksum equal to it (1 in 65536) is then summed anew or left to Python, never corrupted.

One program and two maps per process (``[nar] workers`` > 1: each its own), one tcx link
per ingress interface; a tcx link detaches when its descriptor closes, so nothing stays
attached after the process ends however it ends.
"""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, Literal

import attrs
from twisted.internet.task import LoopingCall

from narsuite.logs import logger
from narsuite.packet import bpf, rtnl
from narsuite.packet.bpf import FP, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, Asm
from narsuite.ratelimit import TokenBucket

__all__ = ["UdpOffload", "DEFERRED", "build_program", "FWD_KEY", "FWD_VALUE", "REV_KEY", "REV_VALUE", "RouteInfo",
           "fwd_key", "rev_key", "COUNTERS"]

log = logger()

#: Counters this module adds to the SOCKS factory's (shown as socks.<name> by narctl nar stats).
COUNTERS = ("udp_offload_datagrams_out", "udp_offload_datagrams_in", "udp_offload_flows",
            "udp_offload_full", "udp_offload_errors", "udp_offload_left_to_python", "udp_offload_deferred",
            "udp_offload_links_gone")

#: What :meth:`UdpOffload.install` returns for a flow over the install rate: not now, ask again later.
DEFERRED: Final = "deferred"

# Map layouts (addresses and ports as they are on the wire, counters native).
#: client ip, relay ip, client port, relay port, DST ip, DST port, pad
FWD_KEY = struct.Struct("<4s4s2s2s4s2s2x")
#: packets, bytes, last seen (ns, CLOCK_MONOTONIC), ifindex, flags, relay ip towards DST, mtu, slow
FWD_VALUE = struct.Struct("<QQQII4sIQ")
#: DST ip, relay ip towards DST, DST port, relay port
REV_KEY = struct.Struct("<4s4s2s2s")
#: packets, bytes, last seen, ifindex, flags, client ip, mtu, relay ip towards the client, client port, slow
REV_VALUE = struct.Struct("<QQQII4sI4s2s2xQ")
#: the counters each direction's kernel figures are folded into (datagrams, offloaded, bytes)
_OUT = ("udp_datagrams_out", "udp_offload_datagrams_out", "bytes_up")
_IN = ("udp_datagrams_in", "udp_offload_datagrams_in", "bytes_down")
FLAG_LOCAL = 1  # a local destination: up the stack (TC_ACT_OK), else bpf_redirect_neigh

ETH_P_IP_LE = 0x0008  # htons(0x0800) as a little-endian u32 load of skb->protocol
PROTO_PSEUDO = 0x1100  # the pseudo header's zero byte and protocol 17, as a little-endian u16


def fwd_key(client: tuple[str, int], relay: tuple[str, int], dest: tuple[str, int]) -> bytes:
    return FWD_KEY.pack(socket.inet_aton(client[0]), socket.inet_aton(relay[0]), client[1].to_bytes(2, "big"),
                        relay[1].to_bytes(2, "big"), socket.inet_aton(dest[0]), dest[1].to_bytes(2, "big"))


def rev_key(dest: tuple[str, int], relay: tuple[str, int]) -> bytes:
    return REV_KEY.pack(socket.inet_aton(dest[0]), socket.inet_aton(relay[0]), dest[1].to_bytes(2, "big"),
                        relay[1].to_bytes(2, "big"))


# ---------------------------------------------------------------- the program

# stack slots (offsets from the frame pointer; every access naturally aligned)
_KEY = -24       # map key (20 bytes)
_FROM = -64      # old pseudo header (12) + old UDP header, checksum 0 (8) + SOCKS header (10) + pad (2)
_NEWP = -80      # new pseudo header (12)
_HDR = -128      # new IPv4 (20) + UDP (8) [+ SOCKS (10) + pad (2)]
_CSUM = -136     # the old UDP checksum field (u64)
_TOT = -144      # the old IPv4 total length, host order (u64)
_SUM = -152      # running sum over the payload (u64)
_BUF = -424      # payload chunk (256 bytes + a zeroed word for a ragged end)
_FIB = -488      # struct bpf_fib_lookup (64 bytes)
FN_fib_lookup = 69
AF_INET = 2
#: bpf_fib_lookup flags: an output lookup restricted to the flow's interface, the neighbour
#: left to bpf_redirect_neigh, the source address the route picks filled in
FIB_FLAGS = (1 << 1) | (1 << 2) | (1 << 4)  # BPF_FIB_LOOKUP_OUTPUT | SKIP_NEIGH | SRC
FIB_FWD_DISABLED = 5  # BPF_FIB_LKUP_RET_FWD_DISABLED: no answer on a host that does not forward
CHUNK = 256
#: The largest payload of a partial-checksum datagram summed in the kernel (larger: Python).
MAX_SUMMED = 64 * CHUNK
FN_skb_load_bytes = 26


def _fold(a: Asm, r: int, tmp: int) -> None:
    """r = 16-bit ones'-complement fold of the 32-bit sum in r."""
    a.alu("mov", r, r, reg=True, bits=32)  # zero-extend (csum_diff returns a 32-bit sum in s64)
    for _ in range(2):
        a.mov(tmp, r)
        a.alu("rsh", tmp, 16)
        a.alu("and", r, 0xFFFF)
        a.alu("add", r, tmp, reg=True)


def _csum_diff(a: Asm, from_off: int | None, from_size: int, to_off: int, to_size: int,
               seed_reg: int | None) -> None:
    """r0 = bpf_csum_diff(fp+from_off, from_size, fp+to_off, to_size, seed)."""
    if seed_reg is not None and seed_reg != R5:
        a.mov(R5, seed_reg)
    elif seed_reg is None:
        a.movi(R5, 0)
    if from_off is None:
        a.movi(R1, 0)
        a.movi(R2, 0)
    else:
        a.mov(R1, FP)
        a.alu("add", R1, from_off)
        a.movi(R2, from_size)
    a.mov(R3, FP)
    a.alu("add", R3, to_off)
    a.movi(R4, to_size)
    a.call(bpf.FN_csum_diff)


def _copy(a: Asm, size: int, src: int, src_off: int, dst_off: int) -> None:
    a.ldx(size, R0, src, src_off)
    a.stx(size, FP, dst_off, R0)


def build_program(fwd_fd: int, rev_fd: int, l2: int = 14, max_summed: int = MAX_SUMMED) -> bytes:
    """The tc program for an interface whose frames carry ``l2`` bytes before the IPv4
    header (14: Ethernet and loopback; 0: tun and other raw-IP devices).  ``max_summed``
    (a multiple of CHUNK) bounds the payload of partial-checksum datagrams it sums."""
    if l2 not in (0, 14):
        raise ValueError("l2 must be 14 (Ethernet, loopback) or 0 (raw IP)")
    if max_summed % CHUNK or not 0 < max_summed <= MAX_SUMMED:
        raise ValueError(f"max_summed must be a multiple of {CHUNK} up to {MAX_SUMMED}")
    L = l2
    a = Asm()
    a.mov(R6, R1)
    a.ldx(4, R0, R6, bpf.SKB["protocol"])
    a.jmp("ne", R0, ETH_P_IP_LE, "next")
    a.ldx(4, R0, R6, bpf.SKB["pkt_type"])
    a.jmp("ne", R0, 0, "next")  # PACKET_HOST only
    a.ldx(4, R0, R6, bpf.SKB["gso_size"])
    a.jmp("ne", R0, 0, "next")
    a.ldx(4, R7, R6, bpf.SKB["data"])
    a.ldx(4, R8, R6, bpf.SKB["data_end"])
    a.mov(R0, R7)
    a.alu("add", R0, L + 28)
    a.jmp("gt", R0, R8, "pull", reg=True)

    a.label("parse")  # r7 = data, at least L+28 bytes linear
    a.ldx(1, R0, R7, L)
    a.jmp("ne", R0, 0x45, "next")  # IPv4, no options
    a.ldx(2, R0, R7, L + 6)
    a.alu("and", R0, 0xFF3F)  # MF and the fragment offset (network order)
    a.jmp("ne", R0, 0, "next")
    a.ldx(1, R0, R7, L + 9)
    a.jmp("ne", R0, 17, "next")
    a.ldx(2, R9, R7, L + 2)
    a.be16(R9)  # total length
    a.ldx(2, R1, R7, L + 24)
    a.be16(R1)  # UDP length
    a.mov(R2, R9)
    a.alu("sub", R2, 20)
    a.jmp("ne", R1, R2, "next", reg=True)
    a.stx(8, FP, _TOT, R9)
    a.jmp("lt", R1, 18, "reverse")
    a.mov(R0, R7)
    a.alu("add", R0, L + 38)
    a.jmp("gt", R0, R8, "reverse", reg=True)
    a.ldx(2, R0, R7, L + 28)
    a.jmp("ne", R0, 0, "reverse")  # RSV
    a.ldx(2, R0, R7, L + 30)
    a.jmp("ne", R0, 0x0100, "reverse")  # FRAG 0, ATYP 1
    _copy(a, 4, R7, L + 12, _KEY)
    _copy(a, 4, R7, L + 16, _KEY + 4)
    _copy(a, 2, R7, L + 20, _KEY + 8)
    _copy(a, 2, R7, L + 22, _KEY + 10)
    _copy(a, 4, R7, L + 32, _KEY + 12)
    _copy(a, 2, R7, L + 36, _KEY + 16)
    a.st(2, FP, _KEY + 18, 0)
    _lookup(a, fwd_fd, "reverse")

    # ---- forward: client -> relay with the header  ==>  relay -> DST without it
    _fits_and_headers(a, L, -10, "fwd_slow")
    _copy(a, 4, R7, L + 28, _FROM + 20)  # the SOCKS header: RSV FRAG ATYP DST.ADDR DST.PORT
    _copy(a, 4, R7, L + 32, _FROM + 24)
    _copy(a, 2, R7, L + 36, _FROM + 28)
    a.st(2, FP, _FROM + 30, 0)
    _copy_ip(a, L)
    _copy(a, 2, R7, L + 22, _HDR + 20)  # source port: the relay's
    _copy(a, 2, R7, L + 36, _HDR + 22)  # destination port: DST.PORT
    a.ldx(2, R0, R7, L + 24)
    a.be16(R0)
    a.alu("sub", R0, 10)
    a.be16(R0)
    a.stx(2, FP, _HDR + 24, R0)
    _copy(a, 4, R7, L + 32, _HDR + 16)  # destination address: DST.ADDR
    a.ldx(4, R0, R9, 32)
    a.stx(4, FP, _HDR + 12, R0)  # source: the relay's address towards DST
    _finish(a, L, udp_len=8, grow=-10, slow="fwd_slow", payload=38, max_summed=max_summed)

    # ---- reverse: DST -> relay  ==>  relay -> client with the header
    a.label("reverse")
    _copy(a, 4, R7, L + 12, _KEY)
    _copy(a, 4, R7, L + 16, _KEY + 4)
    _copy(a, 4, R7, L + 20, _KEY + 8)  # source and destination ports
    _lookup(a, rev_fd, "next")
    _fits_and_headers(a, L, 10, "rev_slow")
    _copy_ip(a, L)
    a.st(2, FP, _HDR + 28, 0)  # RSV
    a.st(2, FP, _HDR + 30, 0x0100)  # FRAG 0, ATYP 1
    _copy(a, 4, R7, L + 12, _HDR + 32)  # DST.ADDR: who sent it
    _copy(a, 2, R7, L + 20, _HDR + 36)  # DST.PORT
    a.st(2, FP, _HDR + 38, 0)
    _copy(a, 2, R7, L + 22, _HDR + 20)  # source port: the relay's
    a.ldx(2, R0, R9, 44)
    a.stx(2, FP, _HDR + 22, R0)  # destination: the client's port
    a.ldx(2, R0, R7, L + 24)
    a.be16(R0)
    a.alu("add", R0, 10)
    a.be16(R0)
    a.stx(2, FP, _HDR + 24, R0)
    a.ldx(4, R0, R9, 40)
    a.stx(4, FP, _HDR + 12, R0)  # source: the address the client sends to
    a.ldx(4, R0, R9, 32)
    a.stx(4, FP, _HDR + 16, R0)  # destination: the client
    _finish(a, L, udp_len=20, grow=10, slow="rev_slow", payload=28, max_summed=max_summed)

    a.label("pull")  # the first L+28 bytes are not linear: pull them, or leave the packet be
    a.mov(R1, R6)
    a.movi(R2, L + 28)
    a.call(bpf.FN_skb_pull_data)
    a.jmp("ne", R0, 0, "next")
    a.ldx(4, R7, R6, bpf.SKB["data"])
    a.ldx(4, R8, R6, bpf.SKB["data_end"])
    a.mov(R0, R7)
    a.alu("add", R0, L + 28)
    a.jmp("gt", R0, R8, "next", reg=True)
    a.ja("parse")

    for slow, off in (("fwd_slow", 40), ("rev_slow", 48)):
        a.label(slow)  # an entry's datagram left to Python (too big, or partial checksum)
        a.movi(R1, 1)
        a.atomic_add(8, R9, off, R1)
        a.ja("next")
    a.label("next")
    a.ret(bpf.TCX_NEXT)
    return a.assemble()


def _lookup(a: Asm, map_fd: int, miss: str) -> None:
    """R9 = the map's value for the key at _KEY; jump to ``miss`` without one."""
    a.ld_map(R1, map_fd)
    a.mov(R2, FP)
    a.alu("add", R2, _KEY)
    a.call(bpf.FN_map_lookup_elem)
    a.jmp("eq", R0, 0, miss)
    a.mov(R9, R0)


def _fits_and_headers(a: Asm, L: int, grow: int, slow: str) -> None:
    """To ``slow`` when the rewritten datagram (old total length + ``grow``) exceeds the MTU
    in the value (R9, offset 36, both directions' layouts); else save the old pseudo and
    UDP headers (:func:`_pseudo_and_udp`)."""
    a.ldx(8, R1, FP, _TOT)
    a.alu("add", R1, grow)
    a.ldx(4, R2, R9, 36)
    a.jmp("gt", R1, R2, slow, reg=True)
    _pseudo_and_udp(a, L)


def _pseudo_and_udp(a: Asm, L: int) -> None:
    """The old pseudo header and UDP header (checksum zeroed) into _FROM; the old checksum into _CSUM."""
    _copy(a, 4, R7, L + 12, _FROM)
    _copy(a, 4, R7, L + 16, _FROM + 4)
    a.st(2, FP, _FROM + 8, PROTO_PSEUDO)
    _copy(a, 2, R7, L + 24, _FROM + 10)
    _copy(a, 4, R7, L + 20, _FROM + 12)
    _copy(a, 2, R7, L + 24, _FROM + 16)
    a.st(2, FP, _FROM + 18, 0)
    a.ldx(2, R0, R7, L + 26)
    a.stx(8, FP, _CSUM, R0)


def _sum_payload(a: Asm, start: int, headers: int, slow: str, d: str, max_summed: int) -> None:
    """R5 = the 32-bit ones'-complement sum of the payload (packet offset ``start``, IPv4 total
    length minus ``headers`` bytes), by chunks through the stack (the payload may be paged);
    larger than ``max_summed``: to ``slow`` (the packet untouched, Python relays it).
    Unrolled: the verifier follows every chunk, so the chunk count is a constant."""
    a.ldx(8, R7, FP, _TOT)
    a.alu("sub", R7, headers)  # bytes left
    a.jmp("gt", R7, max_summed, slow)
    a.movi(R8, start)  # packet offset
    a.st(8, FP, _SUM, 0)
    for _ in range(max_summed // CHUNK):
        a.jmp("eq", R7, 0, d + "_sum_done")
        a.jmp("le", R7, CHUNK, d + "_sum_tail")
        a.mov(R1, R6)
        a.mov(R2, R8)
        a.mov(R3, FP)
        a.alu("add", R3, _BUF)
        a.movi(R4, CHUNK)
        a.call(FN_skb_load_bytes)
        a.jmp("ne", R0, 0, "next")
        a.ldx(8, R5, FP, _SUM)
        _csum_diff(a, None, 0, _BUF, CHUNK, R5)
        a.stx(8, FP, _SUM, R0)
        a.alu("add", R8, CHUNK)
        a.alu("sub", R7, CHUNK)
    a.ja(d + "_sum_done")
    a.label(d + "_sum_tail")  # 1..CHUNK bytes: zero the word the last bytes end in, then load them
    a.mov(R1, R7)
    a.alu("and", R1, 0xFFFC)
    a.alu("add", R1, FP, reg=True)
    a.st(4, R1, _BUF, 0)
    a.mov(R1, R6)
    a.mov(R2, R8)
    a.mov(R3, FP)
    a.alu("add", R3, _BUF)
    a.mov(R4, R7)
    a.call(FN_skb_load_bytes)
    a.jmp("ne", R0, 0, "next")
    a.ldx(8, R5, FP, _SUM)
    a.mov(R4, R7)
    a.alu("add", R4, 3)
    a.alu("and", R4, 0xFFFC)
    a.movi(R1, 0)
    a.movi(R2, 0)
    a.mov(R3, FP)
    a.alu("add", R3, _BUF)
    a.call(bpf.FN_csum_diff)
    a.stx(8, FP, _SUM, R0)
    a.label(d + "_sum_done")
    a.ldx(8, R5, FP, _SUM)


def _copy_ip(a: Asm, L: int) -> None:
    for i in range(0, 20, 4):
        _copy(a, 4, R7, L + i, _HDR + i)


def _finish(a: Asm, L: int, *, udp_len: int, grow: int, slow: str, payload: int, max_summed: int) -> None:
    """Common tail of both directions once _HDR holds the new IPv4 addresses and UDP header
    (checksum 0) and _FROM the old pseudo+UDP headers: checksums, resize, write, count, redirect.
    From here on the packet pointers are not used (the helpers below invalidate them)."""
    d = "f" if grow < 0 else "r"
    # new IPv4 header: TTL 64, total length, checksum
    a.st(1, FP, _HDR + 8, 64)
    a.ldx(8, R0, FP, _TOT)
    a.alu("add", R0, grow)
    a.be16(R0)
    a.stx(2, FP, _HDR + 2, R0)
    a.st(2, FP, _HDR + 10, 0)
    a.st(2, FP, _HDR + 26, 0)  # the UDP checksum, until computed
    _copy(a, 4, FP, _HDR + 12, _NEWP)
    _copy(a, 4, FP, _HDR + 16, _NEWP + 4)
    a.st(2, FP, _NEWP + 8, PROTO_PSEUDO)
    _copy(a, 2, FP, _HDR + 24, _NEWP + 10)
    _csum_diff(a, None, 0, _HDR, 20, None)
    _fold(a, R0, R1)
    a.alu("xor", R0, 0xFFFF)
    a.stx(2, FP, _HDR + 10, R0)
    # Not local: is the route still there, through that interface, with that source?  The
    # kernel answers only where IPv4 forwarding is on for the interface (bpf_fib_lookup's
    # rule); elsewhere the controller's rtnetlink watch is all (a few ms behind the change).
    a.ldx(4, R0, R9, 28)
    a.alu("and", R0, FLAG_LOCAL)
    a.jmp("ne", R0, 0, d + "_routed")
    for off in range(0, 64, 8):
        a.st(8, FP, _FIB + off, 0)
    a.st(1, FP, _FIB, AF_INET)
    a.st(1, FP, _FIB + 1, 17)
    a.ldx(8, R0, FP, _TOT)
    a.alu("add", R0, grow)
    a.stx(2, FP, _FIB + 6, R0)  # tot_len (host order): the route's MTU is checked too
    a.ldx(4, R0, R9, 24)
    a.stx(4, FP, _FIB + 8, R0)  # the flow's interface: the lookup may only use it
    _copy(a, 4, FP, _HDR + 16, _FIB + 32)
    a.mov(R1, R6)
    a.mov(R2, FP)
    a.alu("add", R2, _FIB)
    a.movi(R3, 64)
    a.movi(R4, FIB_FLAGS)
    a.call(FN_fib_lookup)
    a.jmp("eq", R0, FIB_FWD_DISABLED, d + "_routed")
    a.jmp("ne", R0, 0, slow)  # no route through it any more, or over its MTU: Python
    a.ldx(4, R0, FP, _FIB + 16)
    a.ldx(4, R1, FP, _HDR + 12)
    a.jmp("ne", R0, R1, slow, reg=True)  # the route now picks another source: Python
    a.label(d + "_routed")
    # UDP checksum
    a.ldx(8, R0, FP, _CSUM)
    a.jmp("eq", R0, 0, d + "_write")  # none: stays none
    _csum_diff(a, None, 0, _FROM, 12, None)
    _fold(a, R0, R1)
    a.ldx(8, R1, FP, _CSUM)
    a.jmp("eq", R0, R1, d + "_partial", reg=True)
    a.ldx(8, R5, FP, _CSUM)
    a.alu("xor", R5, 0xFFFF)
    _csum_diff(a, _FROM, 32 if grow < 0 else 20, _NEWP, 12, R5)
    a.jmp("slt", R0, 0, "next")
    _csum_diff(a, None, 0, _HDR + 20, udp_len, R0)
    a.jmp("slt", R0, 0, "next")
    _fold(a, R0, R1)
    a.alu("xor", R0, 0xFFFF)
    a.jmp("ne", R0, 0, d + "_csum")
    a.movi(R0, 0xFFFF)  # a computed 0 is sent as all ones (RFC 768)
    a.label(d + "_csum")
    a.stx(2, FP, _HDR + 26, R0)
    a.ja(d + "_write")
    a.label(d + "_partial")  # the pseudo-header sum only: local delivery only
    a.ldx(4, R0, R9, 28)
    a.alu("and", R0, FLAG_LOCAL)
    a.jmp("eq", R0, 0, slow)
    # Write a full checksum, summing the payload here: after shrinking, the UDP header lies past
    # the skb's recorded checksum start and the receiver verifies the sum; after growing it
    # does not, but a full sum is right either way (also for the rare full checksum that equals
    # its pseudo-header sum and was taken for partial).
    _sum_payload(a, L + payload, payload, slow, d, max_summed)
    _csum_diff(a, None, 0, _NEWP, 12, R5)
    _csum_diff(a, None, 0, _HDR + 20, udp_len, R0)
    _fold(a, R0, R1)
    a.alu("xor", R0, 0xFFFF)
    a.jmp("ne", R0, 0, d + "_csum")
    a.movi(R0, 0xFFFF)
    a.ja(d + "_csum")
    a.label(d + "_write")
    a.mov(R1, R6)
    a.movi(R2, grow)
    a.movi(R3, bpf.BPF_ADJ_ROOM_NET)
    a.movi(R4, 0)
    a.call(bpf.FN_skb_adjust_room)
    a.jmp("ne", R0, 0, "next")  # refused: nothing was changed
    a.mov(R1, R6)
    a.movi(R2, L)
    a.mov(R3, FP)
    a.alu("add", R3, _HDR)
    a.movi(R4, 28 if grow < 0 else 38)
    a.movi(R5, bpf.BPF_F_RECOMPUTE_CSUM)
    a.call(bpf.FN_skb_store_bytes)
    a.label(d + "_count")
    a.movi(R1, 1)
    a.atomic_add(8, R9, 0, R1)
    a.ldx(8, R1, FP, _TOT)
    a.alu("sub", R1, payload)
    a.atomic_add(8, R9, 8, R1)
    a.call(bpf.FN_ktime_get_ns)
    a.stx(8, R9, 16, R0)
    a.ldx(4, R0, R9, 28)
    a.alu("and", R0, FLAG_LOCAL)
    a.jmp("eq", R0, 0, d + "_neigh")
    a.ret(bpf.TC_ACT_OK)  # local: on up the stack, the socket is found by the new header
    a.label(d + "_neigh")
    a.ldx(4, R1, R9, 24)
    a.movi(R2, 0)
    a.movi(R3, 0)
    a.movi(R4, 0)
    a.call(bpf.FN_redirect_neigh)
    a.exit()


# ---------------------------------------------------------------- the controller

#: /sys/class/net/<if>/type values whose frames carry 14 bytes before IPv4, and the raw-IP one.
ARPHRD_ETHER, ARPHRD_LOOPBACK, ARPHRD_NONE = 1, 772, 65534
_L2_LEN = {ARPHRD_ETHER: 14, ARPHRD_LOOPBACK: 14, ARPHRD_NONE: 0}
RTN_LOCAL = 2
SIOCGIFMTU, SIOCGIFHWADDR = 0x8921, 0x8927


@attrs.frozen
class RouteInfo:
    """Where the kernel sends datagrams for one address: interface, local or not, our source, MTU."""

    ifindex: int
    local: bool
    source: str
    mtu: int
    l2: int | None  # bytes before IPv4 on that interface; None: a type we do not handle


#: The process's rtnetlink socket for route lookups, opened on first use (in the network
#: namespace of that caller) and kept.
_ROUTES = rtnl.RouteSocket(timeout=1.0)


def kernel_route(ip: str, routes: rtnl.RouteSocket | None = None) -> RouteInfo | None:
    """The route to ``ip`` (RTM_GETROUTE, built with struct: narsuite.packet.rtnl), or None
    without one.  ``routes``: the rtnetlink socket to ask (tests: one in a lab namespace)."""
    try:
        got = (routes or _ROUTES).get(ip)
    except (OSError, ValueError):
        return None
    if got is None or got.oif is None:
        return None
    oif = got.oif
    try:
        # ioctls, not /sys: they answer for the caller's network namespace
        ifr = struct.pack("16s16x", socket.if_indextoname(oif).encode())
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            mtu = struct.unpack_from("i", fcntl.ioctl(s, SIOCGIFMTU, ifr), 16)[0]
            kind = struct.unpack_from("H", fcntl.ioctl(s, SIOCGIFHWADDR, ifr), 16)[0]
    except (OSError, ValueError):
        return None
    if got.mtu:
        mtu = min(mtu, got.mtu)
    src = got.prefsrc
    if not src:
        from narsuite.packet.routing import source_address

        src = source_address(ip, "")
    if not src:
        return None
    return RouteInfo(oif, got.type == RTN_LOCAL, src, mtu, _L2_LEN.get(kind))


RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x1, 0x10, 0x40


RTM_DELLINK = 17
_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")


def deleted_links(buf: bytes) -> list[int]:
    """The interface indexes of the RTM_DELLINK messages in one rtnetlink datagram (a pure
    function: the rest of the messages only mean "something changed")."""
    out = []
    at = 0
    while at + _NLMSGHDR.size <= len(buf):
        length, kind = _NLMSGHDR.unpack_from(buf, at)[:2]
        if length < _NLMSGHDR.size:
            break
        if kind == RTM_DELLINK and length >= _NLMSGHDR.size + _IFINFOMSG.size:
            out.append(_IFINFOMSG.unpack_from(buf, at + _NLMSGHDR.size)[2])
        at += (length + 3) & ~3
    return out


class _RouteWatch:
    """The reactor's reader of an rtnetlink socket: any message means "something changed";
    an RTM_DELLINK also names the interface that went (``changed(deleted, lost)``; ``lost``:
    the socket overflowed, so some may have gone unreported)."""

    def __init__(self, sock: socket.socket, changed: Callable[[list[int], bool], None]) -> None:
        self.sock = sock
        self.changed = changed

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "udp-offload-routes"

    def doRead(self) -> None:
        got = lost = False
        deleted: list[int] = []
        while True:
            try:
                buf = self.sock.recv(65536)
                if not buf:
                    break
                got = True
                deleted += deleted_links(buf)
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: events were lost; revalidate anyway
                got = lost = True
                break
        if got:
            self.changed(deleted, lost)

    def connectionLost(self, reason: Any) -> None:
        pass


@attrs.define
class _Flow:
    """One offloaded (association, destination): its two keys, the routes they were made for,
    and what was already counted."""

    fwd: bytes
    rev: bytes
    owner: Any  # the SOCKS protocol of the association (``_last`` is refreshed from last-seen)
    client: tuple[str, int]
    dest: tuple[str, int]
    routes: tuple[RouteInfo, RouteInfo]  # towards the client, towards DST
    forget: Callable[[], None] | None  # called when a route change took the flow out
    # out packets, out bytes, in packets, in bytes, out left to Python, in left to Python
    seen: list[int] = attrs.Factory(lambda: [0, 0, 0, 0, 0, 0])
    last_ns: int = 0


class UdpOffload:
    """Installs and removes flows, owns the program, maps and links, and folds the kernel's
    counters into the SOCKS factory's (a sweep every ``interval`` seconds).

    Map failures never reach the caller: :meth:`install` returns None (the flow stays
    on the Python path) and counts ``udp_offload_full`` or ``udp_offload_errors``.

    The work is bounded: at most ``installs_per_second`` installs (route lookups, map
    updates, maybe a link) per second and process, as many at once; over that
    :meth:`install` returns :data:`DEFERRED` (counted ``udp_offload_deferred``) and the
    flow stays in Python until its relay asks again."""

    def __init__(self, counters: dict[str, int], max_flows: int, reactor: Any, *,
                 route: Callable[[str], RouteInfo | None] = kernel_route,
                 monotonic_ns: Callable[[], int] = time.monotonic_ns, interval: float = 1.0,
                 installs_per_second: float = 2000, revalidate_batch: int = 8192,
                 revalidate_seconds: float = 0.004) -> None:
        self.counters = counters
        for name in COUNTERS:
            counters.setdefault(name, 0)
        self.max_flows = max_flows
        self.reactor = reactor
        self.route = route
        self.monotonic_ns = monotonic_ns
        self.installs = TokenBucket(installs_per_second, installs_per_second, reactor)
        self.flows: dict[bytes, _Flow] = {}
        self._routes: dict[str, RouteInfo | None] = {}
        self._programs: dict[int, bpf.Program] = {}
        self._links: dict[int, bpf.TcxLink] = {}
        self._lo = socket.if_nametoindex("lo")
        self.fwd = bpf.HashMap(FWD_KEY.size, FWD_VALUE.size, max_flows, "nar_udp_fwd")
        try:
            self.rev = bpf.HashMap(REV_KEY.size, REV_VALUE.size, max_flows, "nar_udp_rev")
        except BaseException:
            self.fwd.close()
            raise
        self._sweeps = 0
        self._watch: _RouteWatch | None = None
        # the revalidation pass under way: the flows to check, how far it got, its next turn
        self._pass: list[_Flow] = []
        self._pass_at = 0
        self._pass_call: Any = None
        self._again = False  # a change came during the pass: another pass follows it
        self._pass_routes: dict[str, RouteInfo | None] = {}
        self.revalidate_batch = revalidate_batch
        self.revalidate_seconds = revalidate_seconds
        self.loop = LoopingCall(self.sweep)
        self.loop.clock = reactor
        self.interval = interval

    @classmethod
    def create(cls, mode: str, counters: dict[str, int], max_flows: int, reactor: Any,
               **kw: Any) -> UdpOffload | None:
        """The controller for ``[nar] udp_offload`` = ``mode``, started; None when "off" or
        when this kernel cannot (then one log line says why)."""
        if mode == "off":
            return None
        try:
            self = cls(counters, max_flows, reactor, **kw)
        except (bpf.BpfError, OSError) as e:
            log.info("socks udp: kernel offload unavailable ({e}); UDP ASSOCIATE relays in Python", e=e)
            return None
        try:
            # a tcx link on lo and back: kernels before 6.6 have no tcx (EINVAL)
            self._link(self._lo, 14).close()
            self._links.pop(self._lo, None)
        except (bpf.BpfError, OSError) as e:
            self.stop()
            log.info("socks udp: kernel offload unavailable ({e}); UDP ASSOCIATE relays in Python",
                     e=str(e).splitlines()[0])
            return None
        try:
            self.watch_routes()
        except OSError as e:  # no rtnetlink: flows keep the routes they were made for
            log.info("socks udp: route changes not watched ({e})", e=e)
        self.loop.start(self.interval, now=False)
        return self

    def _link(self, ifindex: int, l2: int) -> bpf.TcxLink:
        link = self._links.get(ifindex)
        if link is None:
            prog = self._programs.get(l2)
            if prog is None:
                prog = bpf.Program(build_program(self.fwd.fd, self.rev.fd, l2), name=f"nar_udp_l2_{l2}")
                self._programs[l2] = prog
            link = self._links[ifindex] = bpf.TcxLink(prog, ifindex)
        return link

    def _route(self, ip: str) -> RouteInfo | None:
        if ip not in self._routes:
            if len(self._routes) >= 4096:
                self._routes.clear()
            self._routes[ip] = self.route(ip)
        return self._routes[ip]

    def install(self, owner: Any, client: tuple[str, int], relay: tuple[str, int],
                dest: tuple[str, int], forget: Callable[[], None] | None = None
                ) -> _Flow | Literal["deferred"] | None:
        """Offload datagrams between ``client`` (its source) and ``dest`` through the relay
        socket bound to port ``relay[1]`` that the client reaches at ``relay[0]``.  The
        flow, None when it stays on the Python path, or :data:`DEFERRED` over the install
        rate.  ``forget()`` is called if a route change takes the flow out again (the caller
        may then offer it anew)."""
        if len(self.flows) >= self.max_flows:
            self.counters["udp_offload_full"] += 1
            return None
        if dest == relay or dest == client:
            return None
        try:
            fk = fwd_key(client, relay, dest)
        except (OSError, ValueError, OverflowError):
            return None
        if fk in self.flows:
            return self.flows[fk]
        if not self.installs.take():
            self.counters["udp_offload_deferred"] += 1
            return DEFERRED
        to_client = self._route(client[0])
        to_dest = self._route(dest[0])
        if to_client is None or to_dest is None or to_client.l2 is None or to_dest.l2 is None:
            return None
        # A local destination (or client) is reached up the stack of the interface the datagram
        # came in on, with one of our addresses as its source: the kernel takes that for a
        # martian unless the interface is lo (where the sender's route is still attached).
        if (to_dest.local or to_client.local) and not (to_dest.ifindex == to_client.ifindex == self._lo):
            return None
        try:
            rk = rev_key(dest, (to_dest.source, relay[1]))
        except (OSError, ValueError, OverflowError):
            return None
        try:
            self._link(to_client.ifindex, to_client.l2)  # client -> relay arrive there
            self._link(to_dest.ifindex, to_dest.l2)  # DST -> relay arrive there
            self.rev.update(rk, REV_VALUE.pack(
                0, 0, 0, to_client.ifindex,
                FLAG_LOCAL if to_client.local else 0, socket.inet_aton(client[0]), to_client.mtu,
                socket.inet_aton(relay[0]), client[1].to_bytes(2, "big"), 0))
            try:
                self.fwd.update(fk, FWD_VALUE.pack(
                    0, 0, 0, to_dest.ifindex, FLAG_LOCAL if to_dest.local else 0,
                    socket.inet_aton(to_dest.source), to_dest.mtu, 0))
            except BaseException:
                self.rev.delete(rk)
                raise
        except (bpf.BpfError, OSError) as e:
            if e.errno == errno.E2BIG:
                self.counters["udp_offload_full"] += 1
            else:
                self.counters["udp_offload_errors"] += 1
                log.debug("socks udp: offloading {client} -> {dest} failed: {e}", client=client, dest=dest, e=e)
            return None
        flow = self.flows[fk] = _Flow(fk, rk, owner, client, dest, (to_client, to_dest), forget)
        self.counters["udp_offload_flows"] += 1
        return flow

    def remove(self, flows: list[_Flow]) -> None:
        """Take ``flows`` out of the kernel, counting what they relayed since the last sweep."""
        for flow in flows:
            if self.flows.pop(flow.fwd, None) is None:
                continue
            try:
                self._account(flow, self.fwd.lookup(flow.fwd), self.rev.lookup(flow.rev), None)
                self.fwd.delete(flow.fwd)
                self.rev.delete(flow.rev)
            except (bpf.BpfError, OSError) as e:
                self.counters["udp_offload_errors"] += 1
                log.debug("socks udp: removing an offloaded flow failed: {e}", e=e)

    def activity(self, flow: _Flow) -> int | None:
        """The datagrams the kernel relayed for ``flow`` in both directions so far (read from
        the maps now, and folded into the counters), None when it is no longer installed or
        the maps cannot be read.  Its relay asks when it must decide whether the flow is idle."""
        if self.flows.get(flow.fwd) is not flow:
            return None
        try:
            fv, rv = self.fwd.lookup(flow.fwd), self.rev.lookup(flow.rev)
        except (bpf.BpfError, OSError) as e:
            self.counters["udp_offload_errors"] += 1
            log.debug("socks udp: reading an offloaded flow failed: {e}", e=e)
            return None
        self._account(flow, fv, rv, (self.monotonic_ns(), self.reactor.seconds()))
        return sum(flow.seen[i] for i in (0, 2, 4, 5))

    def _fold(self, flow: _Flow, value: bytes, layout: struct.Struct, at: tuple[int, int, int],
              names: tuple[str, str, str]) -> int:
        """Add what the kernel counted in one direction since the last fold (``at``: the
        packets, bytes and left-to-Python slots of ``flow.seen``; ``names``: the datagram,
        offloaded-datagram and byte counters); the direction's last-seen time."""
        packets, nbytes, seen = struct.unpack_from("<QQQ", value)
        slow = layout.unpack(value)[-1]
        p, b, s = at
        dp, db, ds = packets - flow.seen[p], nbytes - flow.seen[b], slow - flow.seen[s]
        flow.seen[p], flow.seen[b], flow.seen[s] = packets, nbytes, slow
        c = self.counters
        c["udp_offload_left_to_python"] += ds
        c[names[0]] += dp
        c[names[1]] += dp
        c[names[2]] += db
        return int(seen)

    def _account(self, flow: _Flow, fv: bytes | None, rv: bytes | None, now: tuple[int, float] | None) -> None:
        last = 0
        if fv is not None:
            last = self._fold(flow, fv, FWD_VALUE, (0, 1, 4), _OUT)
        if rv is not None:
            last = max(last, self._fold(flow, rv, REV_VALUE, (2, 3, 5), _IN))
        if last > flow.last_ns:
            flow.last_ns = last
            if now is not None:  # the idle timer sees offloaded datagrams as activity
                now_ns, now_s = now
                at = now_s - max(0, now_ns - last) / 1e9
                owner = flow.owner
                if at > owner._last:
                    owner._last = at

    def watch_routes(self, sock: socket.socket | None = None) -> None:
        """Revalidate the installed flows whenever the kernel reports a link, address or IPv4
        route change (rtnetlink multicast groups): a flow whose route changed (an uplink down,
        another source chosen) is taken out at once and goes on in Python, which follows the
        kernel; its relay may offload it again with the new route.  ``sock``: an rtnetlink
        socket already bound to the groups (tests make it in another namespace)."""
        if sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, 0)
            sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE))
        self._watch = _RouteWatch(sock, self._changed)
        if hasattr(self.reactor, "addReader"):
            self.reactor.addReader(self._watch)

    def _changed(self, deleted: Iterable[int] = (), lost: bool = False) -> None:
        """The kernel reported a change: drop what hangs on deleted interfaces (all of ours that
        no longer exist when events were ``lost``), then (re)start a revalidation pass."""
        gone = set(deleted)
        if lost:
            for ifindex in list(self._links):
                try:
                    socket.if_indextoname(ifindex)
                except OSError:
                    gone.add(ifindex)
        for ifindex in gone:
            self.link_gone(ifindex)
        self.revalidate()

    def state(self) -> dict[str, int]:
        """What the controller holds now (``narctl nar stats`` shows it as udp_offload.<name>):
        the flows installed and the tcx links, with the interfaces they are on."""
        out = {"installed": len(self.flows), "links": len(self._links)}
        for ifindex in self._links:
            out[f"link.{ifindex}"] = 1
        return out

    def link_gone(self, ifindex: int) -> None:
        """Interface ``ifindex`` was deleted: close our tcx link on it (the kernel detached it,
        but the descriptor and our table would hold it until the process ends; a new interface,
        even of the same name, gets a fresh link) and take out the flows that arrive or leave
        through it at once (their relays told), without waiting for the revalidation pass."""
        link = self._links.pop(ifindex, None)
        if link is not None:
            self.counters["udp_offload_links_gone"] += 1
            try:
                link.close()
            except OSError as e:
                log.debug("socks udp: closing the tcx link of a deleted interface failed: {e}", e=e)
        flows = [f for f in self.flows.values() if ifindex in (f.routes[0].ifindex, f.routes[1].ifindex)]
        if flows:
            self.remove(flows)
            for flow in flows:
                if flow.forget is not None:
                    flow.forget()

    def revalidate(self) -> None:
        """Take out every flow whose routes are no longer what they were installed for.

        A pass checks the flows installed when it started, in slices of at most
        ``revalidate_batch`` flows and ``revalidate_seconds`` per reactor turn (at 65,536 flows
        one go held the reactor for over a second: docs/benchmarks.md,
        bench/bench_revalidate.py).  Each address is asked of the kernel once per pass
        (``_pass_routes``, unbounded for the pass: at most two addresses per flow).

        A change reported during a pass forgets every route: the flows after the pass's
        cursor are then checked against fresh ones, and the flows before it, checked against
        routes that may have moved since, get another pass once this one ends.  So every flow
        is checked after each change, and routes that keep changing (a flapping uplink, a
        router's churn) cannot starve the flows at the end of the list, as restarting from the
        first flow would.  Flows installed during a pass were made with routes looked up after
        the change that started it (``_routes`` is cleared with it); flows removed meanwhile
        are skipped."""
        self._routes.clear()
        self._pass_routes.clear()
        if self._pass_at < len(self._pass):
            self._again = True
        else:
            self._pass = list(self.flows.values())
            self._pass_at = 0
        if self._pass_call is None or not self._pass_call.active():
            self._pass_call = self.reactor.callLater(0, self._revalidate_slice)

    def _revalidate_slice(self) -> None:
        """One reactor turn's share of the pass: a bounded batch, then the next turn."""
        self._pass_call = None
        flows, at = self._pass, self._pass_at
        end = min(len(flows), at + self.revalidate_batch)
        deadline = time.perf_counter() + self.revalidate_seconds
        current = self.flows
        route = self._pass_route
        while at < end:
            f = flows[at]
            at += 1
            if current.get(f.fwd) is f and (route(f.client[0]), route(f.dest[0])) != f.routes:
                self.remove([f])  # here, not after the loop: the slice's time covers it
                if f.forget is not None:
                    f.forget()
                if self._pass is not flows:  # stopped by what forget() did
                    return
            if not at & 15 and time.perf_counter() > deadline:
                break
        self._pass_at = at
        if at >= len(flows) and self._again:
            self._again = False
            self._pass_routes.clear()
            self._pass, self._pass_at = list(self.flows.values()), 0
        if self._pass_at < len(self._pass):
            self._pass_call = self.reactor.callLater(0, self._revalidate_slice)
        else:
            self._pass = []
            self._pass_at = 0
            self._pass_routes.clear()

    def _pass_route(self, ip: str) -> RouteInfo | None:
        """The route to ``ip`` for this revalidation pass: asked of the kernel once per pass."""
        routes = self._pass_routes
        if ip in routes:
            return routes[ip]
        got = routes[ip] = self.route(ip)
        if len(self._routes) < 4096:
            self._routes[ip] = got  # fresh: new flows may use it too
        return got

    def sweep(self) -> None:
        """Fold the kernel's per-flow counters into ours; refresh the associations' activity."""
        self._sweeps += 1
        if self._sweeps % 30 == 0:
            self._routes.clear()  # routes change rarely; new flows look again
        if not self.flows:
            return
        try:
            fwd = dict(self.fwd.items())
            rev = dict(self.rev.items())
        except (bpf.BpfError, OSError) as e:
            self.counters["udp_offload_errors"] += 1
            log.debug("socks udp: reading the offload maps failed: {e}", e=e)
            return
        now = (self.monotonic_ns(), self.reactor.seconds())
        for flow in self.flows.values():
            self._account(flow, fwd.get(flow.fwd), rev.get(flow.rev), now)

    def stop(self) -> None:
        """Count what is left, detach, close every descriptor (idempotent)."""
        if self.loop.running:
            self.loop.stop()
        if self._pass_call is not None and self._pass_call.active():
            self._pass_call.cancel()
        self._pass_call = None
        self._pass, self._pass_at, self._again = [], 0, False
        if self._watch is not None:
            if hasattr(self.reactor, "removeReader"):
                self.reactor.removeReader(self._watch)
            self._watch.sock.close()
            self._watch = None
        if not self.fwd.closed:
            self.remove(list(self.flows.values()))
        for link in self._links.values():
            link.close()
        self._links.clear()
        for prog in self._programs.values():
            prog.close()
        self._programs.clear()
        self.fwd.close()
        self.rev.close()
