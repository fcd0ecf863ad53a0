"""TCP and UDP mappings on N: nftables NAT maps, port reservations, the end-to-end TUN address.

N's own TCP/UDP stack must never see a packet that belongs to a NAR mapping: it would
answer RST or "port unreachable".  The cheapest place to take such packets away from it
is the netfilter prerouting hook, before the routing decision.  The role therefore owns
one table, ``table ip narsuite_nar`` (created at start, deleted at stop), with NAT maps
the mappings are added to and removed from as elements -- no per-mapping rules, no rule
handles, one hash lookup per packet in the kernel::

    map tcp_peer  (Nb . P . Yb . Y port) : target      BIND with DST.PORT != 0
    map tcp_any   (Nb . P . Yb)          : target      BIND with DST.PORT 0 (any Y port)
    map udp_any   (Nb . P)               : target      UDP ASSOCIATE (2.6.1: source ignored)
    map snat_out  (source . proto . P . Yb) : Nb       flows the client starts itself
    map icmp_in   (Nb . Yb . ICMP id)    : target      ICMP-ASSOCIATE: Y's echo requests
    map icmp_out  (Xa . Yb . ICMP id)    : Nb          translated: X's echo requests
    map xlate_out (Xa . Yb . protocol)   : Nb          translated ESP / tunnels from X
    chain prerouting    dnat to <the maps above>       (priority dstnat)
    chain postrouting   snat to ... map @snat_out, @icmp_out   (priority srcnat)
    chain forward_xlate ip saddr set ... map @xlate_out (stateless, forward hook)
    chain forward_mss   TCP MSS clamp in and out of the end-to-end TUN

The target ("where the packet goes instead of N's stack") depends on the mapping:

* **translated**: Xa.  Ports stay; conntrack un-NATs X's answers (Xa:P -> Yb, forwarded
  by N) to Nb:P.  ``snat_out`` (Xa . proto . P . Yb : Nb) also gives Nb:P to flows X
  starts from port P.
* **end-to-end**: :data:`E2E_ADDRESS`, a link-local address routed into a TUN device
  the data plane owns.  The data plane reads the packet there, puts Nb back as the
  destination (checksums fixed) and delivers it like every other end-to-end mapping
  (IP-in-IP/GRE from Na to Xa).  X's answers (Nb:P -> Yb, tunnelled to Na) pass the
  anti-spoofing check, get source :data:`E2E_ADDRESS` and are written *into* the TUN:
  conntrack sees the reply direction of the DNAT and restores Nb:P; a flow X starts
  itself gets Nb from ``snat_out`` (E2E_ADDRESS . proto . P . Yb : Nb).

Port reservation: for every mapping the data plane holds a socket bound (not listening)
to Nb:P of that protocol.  The bind fails if a program on N already uses the port, so
the port is never lent twice, and while it is held N's kernel does not pick P as an
ephemeral port of Nb (whose answers the maps would steal).

Conntrack: NAT rules apply to the first packet of a flow only; a flow already under way
keeps its translation in the conntrack table.  When a mapping goes, its flows' entries are
deleted too (``conntrack -D``, the ``conntrack`` binary of conntrack-tools; without it
the error is logged and such flows live until their conntrack timeout), so a closed
session's established connections stop reaching X at once.

Dependencies: the ``nft`` binary (Debian package ``nftables``), run as ``nft -f -``, and
``conntrack`` (package ``conntrack``); the script text and command lines are built by
the pure functions below (unit-tested without root).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IProcessTransport

from narsuite.logs import logger

__all__ = [
    "TABLE", "E2E_ADDRESS", "TUN_MTU", "MSS", "NftError",
    "table_script", "delete_table_script", "mapping_elements", "elements_script",
    "conntrack_commands",
    "NftRunner", "PortReservations",
]

log = logger()

TABLE = "narsuite_nar"
#: Where end-to-end TCP/UDP mappings are DNATed to: routed into the data plane's TUN.
E2E_ADDRESS = "169.254.78.1"
#: MTU of that TUN: 1500 minus the 24 bytes of GRE (20 for IP-in-IP), so what comes out
#: of it still fits the private link once encapsulated (the kernel sends "fragmentation
#: needed" to Y for larger DF packets).
TUN_MTU = 1476
#: TCP MSS clamped on SYNs in and out of the TUN (TUN_MTU - 40).
MSS = TUN_MTU - 40

_L4 = {6: "tcp", 17: "udp"}


class NftError(RuntimeError):
    """``nft`` failed; the message is its stderr."""


def table_script(tun: str | None, mss: int = MSS) -> str:
    """The whole table, replacing any leftover from an earlier run (one transaction).

    ``tun``: the end-to-end TUN's interface name (None: no MSS clamp chain)."""
    lines = [
        f"add table ip {TABLE}",
        f"delete table ip {TABLE}",
        f"table ip {TABLE} {{",
        "  map tcp_peer { type ipv4_addr . inet_service . ipv4_addr . inet_service : ipv4_addr; }",
        "  map tcp_any { type ipv4_addr . inet_service . ipv4_addr : ipv4_addr; }",
        "  map udp_any { type ipv4_addr . inet_service : ipv4_addr; }",
        "  map snat_out { type ipv4_addr . inet_proto . inet_service . ipv4_addr : ipv4_addr; }",
        "  map icmp_in { typeof ip daddr . ip saddr . icmp id : ip daddr; }",
        "  map icmp_out { typeof ip saddr . ip daddr . icmp id : ip saddr; }",
        "  map xlate_out { type ipv4_addr . ipv4_addr . inet_proto : ipv4_addr; }",
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        "    meta l4proto tcp dnat ip to ip daddr . tcp dport . ip saddr . tcp sport map @tcp_peer",
        "    meta l4proto tcp dnat ip to ip daddr . tcp dport . ip saddr map @tcp_any",
        "    meta l4proto udp dnat ip to ip daddr . udp dport map @udp_any",
        "    icmp type echo-request dnat ip to ip daddr . ip saddr . icmp id map @icmp_in",
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        "    meta l4proto { tcp, udp } snat ip to ip saddr . meta l4proto . th sport . ip daddr"
        " map @snat_out",
        "    icmp type echo-request snat ip to ip saddr . ip daddr . icmp id map @icmp_out",
        "  }",
        "  chain forward_xlate {",
        "    type filter hook forward priority filter; policy accept;",
        "    ip saddr set ip saddr . ip daddr . meta l4proto map @xlate_out",
        "  }",
    ]
    if tun:
        clamp = f"tcp flags syn tcp option maxseg size > {mss} tcp option maxseg size set {mss}"
        lines += [
            "  chain forward_mss {",
            "    type filter hook forward priority mangle; policy accept;",
            f'    oifname "{tun}" {clamp}',
            f'    iifname "{tun}" {clamp}',
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def delete_table_script() -> str:
    """Remove the table whether or not it exists."""
    return f"add table ip {TABLE}\ndelete table ip {TABLE}\n"


def mapping_elements(m: Any, e2e_address: str = E2E_ADDRESS) -> list[tuple[str, str, str]]:
    """(map, key, value) of a ``nar.mapping``: where Y's packets go, and the translation of
    what the client sends.  Pure; the same text adds and deletes.

    * tcp/udp: see the module docstring.
    * icmp: Y's echo requests for (Nb, Yb, id) are DNATed to Xa (translated) or to the
      end-to-end TUN (so N's own stack never answers a mapped identifier, 2.6); a
      translated client's own echo requests (Xa, Yb, id) are SNATed to Nb.  Conntrack
      does the reply direction and the ICMP errors of these flows.
    * ESP and tunnels in translated sessions: what X sends from Xa to Yb gets source Nb
      (``xlate_out``, a stateless rewrite in the forward hook: conntrack must not pair
      Y's packets with one client, N demultiplexes them by SPI / inner address).
    * everything else (end-to-end ESP/AH/tunnels, which X tunnels to N): nothing.
    """
    if m.kind == "icmp":
        target = m.client if m.translated else e2e_address
        out = [("icmp_in", f"{m.lent} . {m.remote} . {m.icmp_id}", target)]
        if m.translated:
            out.append(("icmp_out", f"{m.client} . {m.remote} . {m.icmp_id}", m.lent))
        return out
    if m.kind in ("ipsec", "tunnel"):
        if m.translated and m.proto != 51:
            return [("xlate_out", f"{m.client} . {m.remote} . {m.proto}", m.lent)]
        return []
    if m.kind not in ("tcp", "udp") or _L4.get(m.proto) != m.kind:
        raise ValueError(f"not a tcp/udp mapping: {m.kind}/{m.proto}")
    proto = m.kind
    target = m.client if m.translated else e2e_address
    if m.kind == "tcp":
        if m.remote_port:
            dnat = ("tcp_peer", f"{m.lent} . {m.port} . {m.remote} . {m.remote_port}", target)
        else:
            dnat = ("tcp_any", f"{m.lent} . {m.port} . {m.remote}", target)
    else:
        dnat = ("udp_any", f"{m.lent} . {m.port}", target)
    return [dnat, ("snat_out", f"{target} . {proto} . {m.port} . {m.remote}", m.lent)]


def elements_script(op: str, elements: list[tuple[str, str, str]]) -> str:
    """``add``/``delete element`` lines (deletion names the key only)."""
    if op == "add":
        return "".join(f"add element ip {TABLE} {name} {{ {key} : {value} }}\n"
                       for name, key, value in elements)
    if op == "delete":
        return "".join(f"delete element ip {TABLE} {name} {{ {key} }}\n"
                       for name, key, _value in elements)
    raise ValueError(op)


def conntrack_commands(m: Any) -> list[list[str]]:
    """``conntrack`` arguments deleting the flows of a tcp/udp mapping: those Y started
    (original destination Nb:P, DNATed) and those X started (reply destination Nb:P,
    SNATed).  None for other kinds (ICMP echo flows time out in 30 s)."""
    proto = _L4.get(m.proto)
    if proto is None or m.kind not in ("tcp", "udp"):
        return []
    return [["-D", "-p", proto, "--orig-dst", m.lent, "--orig-port-dst", str(m.port)],
            ["-D", "-p", proto, "--reply-dst", m.lent, "--reply-port-dst", str(m.port)]]


class _NftProcess(protocol.ProcessProtocol):
    transport: IProcessTransport  # spawnProcess sets it before connectionMade
    def __init__(self, script: str, done: defer.Deferred) -> None:
        self.script = script.encode()
        self.done = done
        self.err = b""

    def connectionMade(self) -> None:
        self.transport.write(self.script)
        self.transport.closeStdin()

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        code = getattr(reason.value, "exitCode", 0)
        if code:
            self.done.errback(NftError(self.err.decode(errors="replace").strip() or f"exit {code}"))
        else:
            self.done.callback(None)


class NftRunner:
    """Runs nft scripts: :meth:`run_sync` at start/stop, :meth:`run` (a Deferred, one
    ``nft -f -`` process, strictly one after the other) for mappings."""

    def __init__(self, reactor: Any = None, binary: str = "nft",
                 conntrack: str = "conntrack") -> None:
        self.reactor = reactor
        self.path = shutil.which(binary)
        self.conntrack_path = shutil.which(conntrack)
        self._lock = defer.DeferredLock()

    @property
    def available(self) -> bool:
        return self.path is not None

    def run_sync(self, script: str) -> None:
        if self.path is None:
            raise NftError("nft not found (install the nftables package)")
        r = subprocess.run([self.path, "-f", "-"], input=script, text=True, capture_output=True,
                           timeout=30, check=False)
        if r.returncode:
            raise NftError(r.stderr.strip() or f"exit {r.returncode}")

    def run(self, script: str) -> defer.Deferred:
        return self._lock.run(self._spawn, script)

    def _spawn(self, script: str, argv: list[str] | None = None) -> defer.Deferred:
        path = self.path if argv is None else self.conntrack_path
        if path is None:
            return defer.fail(NftError("nft/conntrack not found (packages nftables, conntrack)"))
        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor
        d: defer.Deferred = defer.Deferred()
        args = [path, "-f", "-"] if argv is None else [path, *argv]
        reactor.spawnProcess(_NftProcess(script, d), path, args, env=None)
        return d

    def conntrack(self, argv: list[str]) -> defer.Deferred:
        """Run ``conntrack argv`` (after the nft scripts queued before it); exit status 1
        ("0 flow entries have been deleted") counts as success."""
        def ran(f):
            f.trap(NftError)
            if "0 flow entries" in str(f.value):
                return None
            return f

        return self._lock.run(self._spawn, "", argv).addErrback(ran)


class PortReservations:
    """Sockets bound to Nb:P (TCP or UDP), one per mapping: see the module docstring."""

    def __init__(self, nb: str, bind: Callable[[int, int], Any] | None = None) -> None:
        self.nb = nb
        self._bind = bind or self._bind_socket
        self._held: dict[tuple[int, int], Any] = {}

    def _bind_socket(self, proto: int, port: int) -> Any:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == 6 else socket.SOCK_DGRAM)
        try:
            s.bind((self.nb, port))
        except OSError:
            s.close()
            raise
        return s

    def reserve(self, proto: int, port: int) -> bool:
        """True if Nb:P of ``proto`` is now held by us; False if N uses it (or we do)."""
        key = (proto, port)
        if key in self._held:
            return False
        try:
            self._held[key] = self._bind(proto, port)
        except OSError as e:
            log.info("nar: port {proto}/{port} on {nb} is in use on N ({e}); not lending it",
                     proto=_L4.get(proto, proto), port=port, nb=self.nb, e=e)
            return False
        return True

    def release(self, proto: int, port: int) -> None:
        s = self._held.pop((proto, port), None)
        if s is not None and hasattr(s, "close"):
            s.close()

    def held(self) -> set[tuple[int, int]]:
        return set(self._held)

    def release_all(self) -> None:
        for key in list(self._held):
            self.release(*key)
