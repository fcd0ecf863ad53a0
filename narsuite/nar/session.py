"""NAR negotiation controller: NAR-MODE and the NAR commands of one control connection.

The SOCKS5 server (``narsuite.nar.server``) frames the SOCKS part and calls:

* :meth:`NarHandler.nar_mode` with a NAR-MODE request; it returns (a Deferred
  of) the SOCKS reply bytes;
* :meth:`NarHandler.nar_data` with every later byte of the connection;
* :meth:`NarHandler.nar_closed` when the connection is lost.

This module decides (flag policy, identifiers, SPIs, conflicts) and writes
``nar.session`` / ``nar.mapping`` records owned by the connection's session
id, so that ``store.drop_owner`` removes them -- and their ICMP id and SPI
leases -- the moment the connection closes.  The data plane
(:mod:`narsuite.nar.dataplane`) only reads those records.

Reply codes we had to choose (the draft only says "as in SOCKS section 6"),
documented in docs/roles/nar-protocol.md:

=========================================  ====
NAR-MODE with DST.PORT != 0                0x01
NAR-MODE with ATYP != 1                    0x08
NAR-MODE while NAR is disabled             0x07
NAR-MODE DST.ADDR unusable (0.0.0.0, ...)  0x01
IN.PROTOCOL not 50/51, TUN.PROTOCOL not    0x07
4/47
LTUN.ADDR IPv6 with TUN.PROTOCOL 4         0x08
LTUN.ADDR name that does not resolve       0x04
tunnel tuple held by another client        0x05
no free ICMP id / SPI / port, mapping      0x01
limit
BIND DST.ADDR neither 0.0.0.0 nor Yb       0x02
BIND ATYP != 1                             0x08
BIND / UDP ASSOCIATE without a TCP/UDP     0x07
data plane (no nft, no TUN)
nftables refused the mapping               0x01
second NAR-MODE on the connection          0x01
SOCKS5 CONNECT (or other) after NAR-MODE   0x07
unparseable input (then close)             wire error code (0x01/0x07/0x08)
=========================================  ====

TCP and UDP (section 3: "Negotiations for UDP and TCP are defined in [SOCKS]"): after
NAR-MODE, a SOCKS5 **BIND** establishes a TCP mapping and **UDP ASSOCIATE** a UDP
mapping on a port P of Nb, answered with one SOCKS reply, BND.ADDR = Nb, BND.PORT = P
(BIND has no second reply in NAR mode: there is no relay, Y's connection goes to X).

* BIND: DST.ADDR is Y (0.0.0.0 means the session's Yb; another address is refused
  0x02 -- a session's mappings are towards its Yb), DST.PORT Y's source port (0: any).
  Tuple (Nb, P, Yb, Y port), P chosen by N.
* UDP ASSOCIATE: DST.PORT is the port the client will use on Nb -- in SOCKS it is the
  port the client sends from, which in NAR is on Nb -- honoured if free, else another
  is assigned (as ICMP ids); 0: N chooses.  DST.ADDR is ignored.  Tuple (Nb, P); Y's
  source address is ignored (2.6.1, RFC 1123).

P is leased in ``nar.tcp:<Nb>`` / ``nar.udp:<Nb>`` (chosen from :data:`PORT_RANGE`,
below the kernel's ephemeral range) and must also be free on N itself: the data plane
holds a socket bound to Nb:P for the mapping's life.  The reply is sent only once the
data plane has put the mapping into the kernel (:mod:`narsuite.nar.nft`).
"""

from __future__ import annotations

import collections
import ipaddress
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import LogLevel

from narsuite.logs import Aggregator, logger
from narsuite.nar import wire
from narsuite.nar.records import MAPPING, SESSION, NarMapping, NarSession
from narsuite.store import Conflict, Exhausted, StoreBackendError

__all__ = ["NarHandler", "grant_flags", "MAX_BUFFER", "HIGH_WATER", "LOW_WATER", "PORT_RANGE"]

log = logger()

#: Pipelined commands: above HIGH_WATER bytes pending the connection stops being read
#: (``conn.pause()``, TCP back-pressure on the client); below LOW_WATER it is read again.
HIGH_WATER = 16 * 1024
LOW_WATER = 4 * 1024
#: A client whose transport ignores the pause (it cannot: one read is at most the
#: transport's buffer size) is cut off beyond this.
MAX_BUFFER = 1024 * 1024

#: Ports N chooses P from for TCP/UDP mappings: below Linux's default ephemeral range
#: (32768-60999), above the usual services.  A requested UDP port >= 1024 outside it is
#: honoured too if free.  (Not yet a config key.)
PORT_RANGE = (20000, 32767)

#: SOCKS5 commands that make mappings in NAR mode.
CMD_BIND = 0x02
CMD_UDP = 0x03

#: Tries to find a port free both in the store and on N before giving up.
PORT_TRIES = 8


def grant_flags(requested: int, translated: str, gre: str) -> int:
    """The FLAG byte of the NAR-MODE reply for ``requested`` under the policies.

    ``translated``/``gre`` are "allow" (grant on request), "refuse" (never) or
    "impose" (always).  TRANSLATED-NAR granted makes the other bits irrelevant
    (section 3.1): the reply then has TRANSLATED only.  L2TP is never granted;
    a refused bit is simply absent from the reply, which the client must obey
    (section 3.1: "the client MUST conform"), so a refused TRANSLATED means
    end-to-end and a refused GRE or L2TP means IP-in-IP.
    """
    want_t = bool(requested & wire.FLAG_TRANSLATED)
    if translated == "impose" or (translated == "allow" and want_t):
        return wire.FLAG_TRANSLATED
    want_g = bool(requested & wire.FLAG_GRE)
    if gre == "impose" or (gre == "allow" and want_g):
        return wire.FLAG_GRE
    return 0


@attrs.define
class _Conn:
    """Per-connection state of a NAR-mode control connection."""

    conn: Any
    session: NarSession
    buf: bytearray = attrs.field(factory=bytearray)
    busy: bool = False  # a command is waiting for the store
    pumping: bool = False
    paused: bool = False  # we asked the connection to stop reading (HIGH_WATER)
    closed: bool = False
    next_mapping: int = 0


class NarHandler:
    """The ``nar_handler`` the SOCKS5 server calls (see the module docstring).

    :param options: ``NarOptions`` (``[nar.nar]``).
    :param store: the shared store; the kinds ``nar.session`` and ``nar.mapping``
        are registered here if the role did not already.
    :param reactor: for time (nothing is scheduled today; kept for the interface).
    :param installer: what puts TCP/UDP mappings into the kernel (``reserve_port``,
        ``release_port``, ``install_mapping``); default: the running
        :class:`~narsuite.nar.dataplane.NarDataPlane` of the same store.
    :param port_range: where N chooses TCP/UDP ports from.
    """

    def __init__(self, options, store, reactor=None, *,
                 installer=None, port_range: tuple[int, int] = PORT_RANGE) -> None:
        self.options = options
        self.store = store
        self.reactor = reactor
        self._installer = installer
        self.port_range = port_range
        self.commands = wire.NarCommands.from_options(options)
        #: The SOCKS server's RuleSet (set by the role): BIND/UDP mappings in NAR mode are checked
        #: against it like the SOCKS commands they are.
        self.rules: Any = None
        for kind in (SESSION, MAPPING):
            store.register(kind)
        self.counters: collections.Counter[str] = collections.Counter()
        #: Refusals and garbage, which a client can provoke at will (pipelined commands):
        #: the first few per reason and interval in full, then counts (narsuite.logs.Aggregator).
        self.events = Aggregator(log, "nar refusals", reactor, interval=10.0, first=5,
                                 level=LogLevel.warn)
        self._conns: dict[str, _Conn] = {}

    # ----------------------------------------------------------------------- NAR-MODE
    def nar_mode(self, conn, request) -> defer.Deferred:
        """Answer NAR-MODE: validate, apply the flag policy, record the session."""
        sid = conn.session_id
        opts = self.options
        c = self.counters
        c["mode_requests"] += 1

        def refuse(rep: int, why: str) -> defer.Deferred:
            c["mode_refused"] += 1
            c[f"mode_refused_{rep:#04x}"] += 1
            self.events.event(f"mode_refused_{rep:#04x}",
                              "nar {sid}: NAR-MODE from {client} refused ({rep:#04x}): {why}",
                              sid=sid, client=conn.client, rep=rep, why=why)
            return defer.succeed(wire.encode_socks_reply(rep))

        if not opts.enabled:
            return refuse(wire.REP_COMMAND_NOT_SUPPORTED, "NAR is disabled")
        if sid in self._conns:
            return refuse(wire.REP_GENERAL_FAILURE, "already in NAR mode")
        if request.atyp != wire.ATYP_IPV4:
            return refuse(wire.REP_ADDRESS_TYPE_NOT_SUPPORTED, f"ATYP {request.atyp}")
        if request.port != 0:
            return refuse(wire.REP_GENERAL_FAILURE, f"DST.PORT {request.port} (must be 0)")
        # narsuite.nar.socks.Request names DST.ADDR ``host``; accept ``addr`` as well.
        addr = getattr(request, "host", None) or getattr(request, "addr", "")
        try:
            yb = ipaddress.IPv4Address(addr)
            xa = ipaddress.IPv4Address(conn.client)
        except ValueError:
            return refuse(wire.REP_GENERAL_FAILURE, f"DST.ADDR {addr!r} / client "
                          f"{conn.client!r} not IPv4")
        if yb.is_unspecified or yb.is_multicast or yb == ipaddress.IPv4Address("255.255.255.255"):
            return refuse(wire.REP_GENERAL_FAILURE, f"DST.ADDR {yb} cannot be a peer")
        flags = grant_flags(request.flags, opts.translated, opts.gre)
        session = NarSession(
            id=sid, client=str(xa), remote=str(yb), lent=opts.lent_address,
            translated=bool(flags & wire.FLAG_TRANSLATED), gre=bool(flags & wire.FLAG_GRE),
            l2tp=False, user=getattr(conn, "user", "") or "",
        )
        state = _Conn(conn, session)
        self._conns[sid] = state
        if request.flags & wire.FLAG_L2TP:
            c["mode_l2tp_refused"] += 1
        if request.flags != flags:
            c["mode_flags_changed"] += 1

        def written(_: object) -> bytes:
            c["mode_granted"] += 1
            log.info("nar {sid}: NAR mode for {client} -> {remote} lent {nb} "
                     "flags requested {req:#04x} granted {flags:#04x}",
                     sid=sid, client=session.client, remote=session.remote,
                     nb=session.lent, req=request.flags, flags=flags)
            if state.closed:  # the connection went while the store was writing
                self.store.drop_owner(sid)
            return wire.encode_socks_reply(wire.REP_SUCCEEDED, flags, session.lent, 0)

        def failed(f) -> bytes:
            self._conns.pop(sid, None)
            c["mode_refused"] += 1
            c["store_errors"] += 1
            log.failure("nar {sid}: cannot record the NAR session", f, sid=sid)
            return wire.encode_socks_reply(wire.REP_GENERAL_FAILURE)

        return self.store.put(session, kind=SESSION.name, owner=sid).addCallbacks(written, failed)

    # ---------------------------------------------------------------------- commands
    def nar_data(self, conn, data: bytes) -> None:
        """Bytes after NAR-MODE: buffered, parsed and answered in order."""
        st = self._conns.get(conn.session_id)
        if st is None or st.closed:
            self.counters["data_without_session"] += 1
            self.events.event("data_without_session", "nar {sid}: data without a NAR session; closing",
                              sid=conn.session_id)
            conn.close()
            return
        st.buf += data
        if len(st.buf) > MAX_BUFFER:
            self._fatal(st, wire.REP_GENERAL_FAILURE, f"{len(st.buf)} bytes pending")
            return
        if len(st.buf) > HIGH_WATER and not st.paused and hasattr(st.conn, "pause"):
            # Back-pressure, not a cut-off: the client's pipelined commands wait in its
            # own socket buffer until we have answered enough of them.
            st.paused = True
            self.counters["paused"] += 1
            st.conn.pause()
        self._pump(st)

    def _pump(self, st: _Conn) -> None:
        if st.pumping:
            return
        st.pumping = True
        try:
            while not st.busy and not st.closed and st.buf:
                try:
                    parsed = wire.parse_command(st.buf, self.commands)
                except wire.NarWireError as e:
                    self._fatal(st, e.code, str(e))
                    return
                if parsed is None:
                    return
                msg, used = parsed
                del st.buf[:used]
                st.busy = True
                d = defer.maybeDeferred(self._command, st, msg)
                d.addErrback(self._internal_error, st, msg)
                d.addCallback(self._answer, st)
        finally:
            st.pumping = False
            if st.paused and len(st.buf) <= LOW_WATER and not st.closed:
                st.paused = False
                st.conn.resume()

    def _answer(self, reply: bytes, st: _Conn) -> None:
        st.busy = False
        if st.closed:
            # Anything written for a command that finished after the close goes now.
            self.store.drop_owner(st.session.id)
            return
        st.conn.write(reply)
        self._pump(st)

    def _internal_error(self, f, st: _Conn, msg) -> bytes:
        self.counters["internal_errors"] += 1
        log.failure("nar {sid}: command {msg!r} failed", f, sid=st.session.id, msg=msg)
        return _failure_reply(msg, wire.REP_GENERAL_FAILURE)

    def _fatal(self, st: _Conn, code: int, why: str) -> None:
        self.counters["garbage"] += 1
        self.events.event("garbage", "nar {sid}: unparseable input from {client} ({why}); answering "
                          "{code:#04x} and closing", sid=st.session.id, client=st.session.client,
                          why=why, code=code)
        st.buf.clear()
        st.conn.write(wire.encode_error(code))
        st.conn.close()

    def _refuse(self, st: _Conn, msg, rep: int, why: str) -> bytes:
        name = type(msg).__name__
        self.counters["commands_refused"] += 1
        self.counters[f"refused_{rep:#04x}"] += 1
        self.events.event(f"refused_{rep:#04x}", "nar {sid}: {name} refused ({rep:#04x}): {why}",
                          sid=st.session.id, name=name, rep=rep, why=why)
        return _failure_reply(msg, rep)

    def _command(self, st: _Conn, msg):
        c = self.counters
        if isinstance(msg, wire.SocksRequest) and msg.cmd == self.options.mode_command:
            c["mode_again"] += 1
            return self._refuse(st, msg, wire.REP_GENERAL_FAILURE,
                                "NAR-MODE on a connection already in NAR mode")
        if isinstance(msg, wire.SocksRequest) and msg.cmd not in (CMD_BIND, CMD_UDP):
            c["socks_after_nar_mode"] += 1
            return self._refuse(st, msg, wire.REP_COMMAND_NOT_SUPPORTED,
                                f"SOCKS5 command {msg.cmd:#04x} in NAR mode")
        c["commands"] += 1
        n = len(self.store.lookup_all(MAPPING.name, "session", st.session.id))
        if n >= self.options.max_mappings_per_session:
            c["limit_reached"] += 1
            return self._refuse(st, msg, wire.REP_GENERAL_FAILURE,
                                f"max_mappings_per_session ({n}) reached")
        if isinstance(msg, wire.IcmpAssociate):
            return self._icmp(st, msg)
        if isinstance(msg, wire.IpsecAssociate):
            return self._ipsec(st, msg)
        if isinstance(msg, wire.SocksRequest):
            if self.rules is not None:
                # NAR-MODE passed the "nar" rules; each TCP/UDP mapping is also a BIND or a
                # UDP association towards Yb, and answers to the operator's rules as such.
                command = "bind" if msg.cmd == CMD_BIND else "udp"
                decision = self.rules.check(st.conn.client, st.conn.user or "", command,
                                            st.session.remote, msg.port or None)
                if not decision.allowed:
                    c["rule_blocks"] += 1
                    return self._refuse(st, msg, wire.REP_NOT_ALLOWED,
                                        f"{command} towards {st.session.remote} blocked by the rules")
            return self._tcpudp(st, msg)
        return self._tunnel(st, msg)

    def _mapping(self, st: _Conn, **fields: Any) -> NarMapping:
        s = st.session
        st.next_mapping += 1
        return NarMapping(id=f"{s.id}/{st.next_mapping}", session=s.id, client=s.client,
                          lent=s.lent, remote=s.remote, encap="gre" if s.gre else "ipip",
                          **fields)

    def _insert(self, st: _Conn, mapping: NarMapping, reply: bytes) -> defer.Deferred:
        def done(_: object) -> bytes:
            self.counters["mappings"] += 1
            self.counters[f"mappings_{mapping.kind}"] += 1
            log.info("nar {sid}: mapping {id} {kind} proto {proto} icmp_id {icmp_id} spi {spi:#x} "
                     "inner {inner} port {port} remote_port {rport} {mode} for {client}",
                     sid=st.session.id, id=mapping.id,
                     kind=mapping.kind, proto=mapping.proto, icmp_id=mapping.icmp_id,
                     spi=mapping.spi, inner=mapping.inner, port=mapping.port,
                     rport=mapping.remote_port, client=mapping.client,
                     mode="translated" if mapping.translated else f"end-to-end/{mapping.encap}")
            return reply

        return self.store.insert(mapping, kind=MAPPING.name, owner=st.session.id).addCallback(done)

    # ICMP-ASSOCIATE --------------------------------------------------------------
    def _icmp(self, st: _Conn, msg: wire.IcmpAssociate):
        s = st.session
        held = self.store.lookup(MAPPING.name, "icmp", (s.lent, s.remote, msg.icmp_id))
        if held is not None and held.session == s.id:
            self.counters["confirmed_again"] += 1
            return wire.encode_icmp(wire.REP_SUCCEEDED, msg.icmp_id)
        lo, hi = self.options.icmp_ids
        ns = f"nar.icmp:{s.lent}:{s.remote}"

        def allocated(ident: int):
            if ident == msg.icmp_id:
                self.counters["icmp_id_confirmed"] += 1
            else:
                self.counters["icmp_id_assigned"] += 1
            m = self._mapping(st, kind="icmp", proto=1, translated=s.translated, icmp_id=ident)
            return self._insert(st, m, wire.encode_icmp(wire.REP_SUCCEEDED, ident)).addErrback(
                self._undo, st, msg, ns, ident)

        d = self.store.allocate_number(ns, lo, hi, s.id, prefer=msg.icmp_id)
        return d.addCallbacks(allocated, self._exhausted, errbackArgs=(st, msg))

    # IPSEC-ASSOCIATE -------------------------------------------------------------
    def _ipsec(self, st: _Conn, msg: wire.IpsecAssociate):
        s = st.session
        if msg.protocol not in (50, 51):
            return self._refuse(st, msg, wire.REP_COMMAND_NOT_SUPPORTED,
                                f"IN.PROTOCOL {msg.protocol} (50 ESP or 51 AH)")
        if msg.protocol == 51 and s.translated:
            # AH covers the outer addresses (2.6.2): it cannot be translated, and delivering it
            # end-to-end to a client that was granted translated delivery (no decapsulator on
            # X) only gets "protocol unreachable" back from X.
            self.counters["ah_in_translated_refused"] += 1
            return self._refuse(st, msg, wire.REP_COMMAND_NOT_SUPPORTED,
                                "AH in a translated session (AH covers the addresses translation "
                                "changes); use an end-to-end session")
        if msg.spi:
            self.counters["client_spi_overridden"] += 1

        def allocated(spi: int):
            # ESP follows the session: the format cannot say transport mode, so a client with
            # transport-mode ESP must not ask for TRANSLATED-NAR.  (AH: end-to-end sessions only.)
            translated = s.translated
            m = self._mapping(st, kind="ipsec", proto=msg.protocol, translated=translated, spi=spi)
            return self._insert(st, m, wire.encode_ipsec(wire.REP_SUCCEEDED, msg.protocol, spi)
                                ).addErrback(self._undo, st, msg, "spi", spi)

        d = self.store.allocate_spi(s.id)
        return d.addCallbacks(allocated, self._exhausted, errbackArgs=(st, msg))

    # TUNNEL-ASSOCIATE ------------------------------------------------------------
    def _tunnel(self, st: _Conn, msg: wire.TunnelAssociate):
        """TUNNEL-ASSOCIATE (3.4).  LTUN.ADDR may be IPv4 (ATYP 1), a domain name (ATYP 3,
        resolved on N; the reply confirms the name as sent) or IPv6 (ATYP 4: the inner
        packets are IPv6, which only GRE carries -- IP-in-IP is IPv4 in IPv4, RFC 2003)."""
        if msg.protocol not in (4, 47):
            return self._refuse(st, msg, wire.REP_COMMAND_NOT_SUPPORTED,
                                f"TUN.PROTOCOL {msg.protocol} (4 IP-in-IP or 47 GRE)")
        if msg.atyp == wire.ATYP_DOMAIN:
            self.counters["tunnel_names"] += 1

            def unresolved(f):
                self.counters["tunnel_name_errors"] += 1
                return self._refuse(st, msg, wire.REP_HOST_UNREACHABLE,
                                    f"LTUN.ADDR {msg.addr!r} does not resolve: {f.getErrorMessage()}")

            d = defer.maybeDeferred(self.resolve, msg.addr)
            return d.addCallbacks(lambda addr: self._tunnel_to(st, msg, addr), unresolved)
        return self._tunnel_to(st, msg, msg.addr)

    def _tunnel_to(self, st: _Conn, msg: wire.TunnelAssociate, addr: str):
        s = st.session
        inner = ipaddress.ip_address(addr)
        if inner.version == 6 and msg.protocol != 47:
            return self._refuse(st, msg, wire.REP_ADDRESS_TYPE_NOT_SUPPORTED,
                                f"LTUN.ADDR {inner} is IPv6: IP-in-IP carries IPv4 only; use GRE")
        if inner.is_unspecified or inner.is_multicast:
            return self._refuse(st, msg, wire.REP_GENERAL_FAILURE, f"LTUN.ADDR {inner}")
        reply = wire.encode_tunnel(wire.REP_SUCCEEDED, msg.atyp, msg.addr, msg.protocol)
        key = (s.remote, str(inner), s.lent)
        held = self.store.lookup(MAPPING.name, "tunnel", key)
        if held is not None:
            if held.session == s.id and held.proto == msg.protocol:
                self.counters["confirmed_again"] += 1
                return reply
            self.counters["tunnel_conflicts"] += 1
            return self._refuse(st, msg, wire.REP_CONNECTION_REFUSED,
                                f"tunnel {key} is held by {held.session}")
        m = self._mapping(st, kind="tunnel", proto=msg.protocol, translated=s.translated,
                          inner=str(inner))

        def conflict(f):
            f.trap(Conflict)
            self.counters["tunnel_conflicts"] += 1
            return self._refuse(st, msg, wire.REP_CONNECTION_REFUSED, str(f.value))

        return self._insert(st, m, reply).addErrback(conflict)

    def resolve(self, name: str) -> defer.Deferred[str]:
        """A TUNNEL-ASSOCIATE domain name to an address (IPv4 first), off the reactor
        thread (getaddrinfo in the reactor's thread pool)."""
        import socket

        from twisted.internet.threads import deferToThreadPool

        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor

        def lookup() -> str:
            infos = socket.getaddrinfo(name, None, 0, socket.SOCK_STREAM)
            infos.sort(key=lambda i: i[0] != socket.AF_INET)
            if not infos:
                raise OSError(f"no address for {name}")
            return str(infos[0][4][0])

        return deferToThreadPool(reactor, reactor.getThreadPool(), lookup)

    # BIND / UDP ASSOCIATE (TCP and UDP mappings, 2.6.1) -------------------------------
    def installer(self):
        if self._installer is not None:
            return self._installer
        from narsuite.nar.dataplane import tcpudp_installer

        return tcpudp_installer(self.store)

    def _tcpudp(self, st: _Conn, msg: wire.SocksRequest):
        s = st.session
        inst = self.installer()
        tcp = msg.cmd == CMD_BIND
        name = "BIND" if tcp else "UDP ASSOCIATE"
        if inst is None:
            self.counters["tcpudp_unavailable"] += 1
            return self._refuse(st, msg, wire.REP_COMMAND_NOT_SUPPORTED,
                                f"{name}: no TCP/UDP data plane (see the data plane's log)")
        proto = 6 if tcp else 17
        prefer = None
        remote_port = 0
        if tcp:
            if msg.atyp != wire.ATYP_IPV4:
                return self._refuse(st, msg, wire.REP_ADDRESS_TYPE_NOT_SUPPORTED,
                                    f"BIND DST.ADDR ATYP {msg.atyp}")
            if msg.addr not in ("0.0.0.0", s.remote):
                return self._refuse(st, msg, wire.REP_NOT_ALLOWED,
                                    f"BIND DST.ADDR {msg.addr}: this session's peer is {s.remote}")
            remote_port = msg.port
        else:
            held = self.store.lookup(MAPPING.name, "udp", (s.lent, msg.port))
            if msg.port and held is not None and held.session == s.id:
                self.counters["confirmed_again"] += 1
                return wire.encode_socks_reply(wire.REP_SUCCEEDED, 0, s.lent, msg.port)
            prefer = msg.port or None
        ns = f"nar.{'tcp' if tcp else 'udp'}:{s.lent}"

        def allocated(port: int):
            if prefer is not None:
                self.counters["udp_port_confirmed" if port == prefer else "udp_port_assigned"] += 1
            m = self._mapping(st, kind="tcp" if tcp else "udp", proto=proto,
                              translated=s.translated, port=port, remote_port=remote_port)
            reply = wire.encode_socks_reply(wire.REP_SUCCEEDED, 0, s.lent, port)

            def inserted(r: bytes):
                return inst.install_mapping(m).addCallbacks(lambda _: r, not_installed)

            def not_inserted(f):
                inst.release_port(proto, port)
                return self._undo(f, st, msg, ns, port)

            def not_installed(f):
                self.counters["install_errors"] += 1
                log.error("nar {sid}: cannot install {name} mapping {id}: {e}", sid=s.id,
                          name=name, id=m.id, e=f.getErrorMessage())
                self.store.delete(MAPPING.name, m.id)
                self.store.release(ns, port)
                inst.release_port(proto, port)
                return self._refuse(st, msg, wire.REP_GENERAL_FAILURE,
                                    f"{name}: the data plane refused it")

            return self._insert(st, m, reply).addCallbacks(inserted, not_inserted)

        d = self._allocate_port(st, inst, ns, proto, prefer)
        return d.addCallbacks(allocated, self._exhausted, errbackArgs=(st, msg))

    @defer.inlineCallbacks
    def _allocate_port(self, st: _Conn, inst, ns: str, proto: int,
                       prefer: int | None):
        """A port free in the store (lease ``ns``) and on N (the installer's reservation)."""
        sid = st.session.id
        lo, hi = self.port_range
        for attempt in range(PORT_TRIES):
            port = None
            if attempt == 0 and prefer is not None and prefer >= 1024:
                try:
                    port = (yield self.store.claim(ns, prefer, sid)).value
                except Conflict:
                    port = None
            else:
                port = yield self.store.allocate_number(ns, lo, hi, sid)
            if port is None:
                continue
            if inst.reserve_port(proto, port):
                return port
            self.counters["port_in_use_on_n"] += 1
            yield self.store.release(ns, port)
        raise Exhausted(f"{ns}: no port free on N after {PORT_TRIES} tries")

    # errors ---------------------------------------------------------------------------
    def _exhausted(self, f, st: _Conn, msg) -> bytes:
        f.trap(Exhausted, Conflict, StoreBackendError)
        if f.check(StoreBackendError):
            # The shared store is unreachable (store.backend = "redis"): no new allocation,
            # refused with SOCKS's own general failure; existing mappings keep forwarding.
            self.counters["store_unavailable"] += 1
        else:
            self.counters["exhausted"] += 1
        return self._refuse(st, msg, wire.REP_GENERAL_FAILURE, str(f.value))

    def _undo(self, f, st: _Conn, msg, ns: str, value: int) -> bytes:
        self.store.release(ns, value).addErrback(
            lambda e: log.warn("nar: releasing {ns} {v} failed: {e}", ns=ns, v=value, e=e.getErrorMessage()))
        f.trap(Conflict, StoreBackendError)
        if f.check(StoreBackendError):
            self.counters["store_unavailable"] += 1
        return self._refuse(st, msg, wire.REP_GENERAL_FAILURE, str(f.value))

    # ------------------------------------------------------------------------- close
    def nar_closed(self, conn) -> defer.Deferred:
        """The control connection is gone: its session, mappings and leases go with it."""
        sid = conn.session_id
        st = self._conns.pop(sid, None)
        if st is not None:
            st.closed = True
        d = self.store.drop_owner(sid)

        def dropped(n: int) -> int:
            self.counters["sessions_closed"] += 1
            self.counters["records_dropped"] += n
            log.info("nar {sid}: control connection closed; {n} records dropped", sid=sid, n=n)
            return n

        return d.addCallback(dropped)

    def last_activity(self, conn) -> float:
        """When the data plane last carried a packet of this session's mappings (or from its
        client); 0.0 if never.  The SOCKS server's session idle limit asks this."""
        from narsuite.nar.dataplane import last_activity

        return last_activity(self.store, conn.session_id, conn.client)

    def sessions(self) -> list[NarSession]:
        """The sessions of the open NAR-mode connections (for narctl / the manhole)."""
        return [st.session for st in self._conns.values()]


def _failure_reply(msg, rep: int) -> bytes:
    """The reply to a refused command: its own format, fields echoed (SPI 0)."""
    if isinstance(msg, wire.IcmpAssociate):
        return wire.encode_icmp(rep, msg.icmp_id)
    if isinstance(msg, wire.IpsecAssociate):
        return wire.encode_ipsec(rep, msg.protocol, 0)
    if isinstance(msg, wire.TunnelAssociate):
        return wire.encode_tunnel(rep, msg.atyp, msg.addr, msg.protocol)
    return wire.encode_socks_reply(rep)
