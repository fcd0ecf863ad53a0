"""The NAR client for X: negotiate mappings over SOCKS5, carry Nb on a TUN device.

Library::

    proto = yield NarClient.connect(reactor, "10.0.0.1", 1080, user=..., password=...)
    lent, flags = yield proto.nar_mode("192.0.2.10", flags=0)        # Yb; reply: Nb, granted flags
    spi = yield proto.ipsec_associate(50)                            # the SPI Y must use towards Nb
    ident = yield proto.icmp_associate(4242)                         # confirmed or overridden
    yield proto.tunnel_associate("10.2.0.100", 4)                    # Xb, IP-in-IP
    nb, p = yield proto.bind("192.0.2.10", 0)                        # TCP: Y may connect to Nb:p
    nb, q = yield proto.udp_associate(5353)                          # UDP: Nb:q (5353 if free)
    ...
    proto.transport.loseConnection()                                 # the mappings go with it

Data path (end-to-end mode): :class:`BorrowedAddress` owns a TUN device with
Nb/32 and a route to Yb through it, so ordinary programs on X talk to Y from
Nb.  What the kernel routes into the TUN is tunnelled from Xa to Na, in GRE if
the server granted or imposed GRE in its NAR-MODE reply, else IP-in-IP
(N's address on X's side); what N delivers (IP-in-IP or GRE from Na) is
decapsulated and written to the TUN, where the kernel hands it to the local
program.  In translated mode N rewrites the destination to Xa and nothing is
needed on X.

TCP/UDP mappings: in translated mode N DNATs Y's packets to Xa with the port
unchanged, so a server on X listens on P (any address); in end-to-end mode they come
through the TUN to Nb:P, so the server listens on Nb:P or the wildcard.

Console: ``narsuite-nar-client --server 10.0.0.1 --remote 192.0.2.10 --ipsec esp --icmp 4242
--bind-tcp 0 --udp 0 --tun`` prints one JSON line with what was negotiated, then holds the
mappings until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
from collections import deque
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import ClientFactory, Protocol

from narsuite.nar import socks, wire
from narsuite.packet import codec
from narsuite.packet.routing import source_address

__all__ = ["NarClient", "NarRefused", "BorrowedAddress", "main"]

METHOD_NONE = 0x00
METHOD_PASSWORD = 0x02


class NarRefused(Exception):
    """The server answered a request with a non-zero reply code."""

    def __init__(self, what: str, code: int) -> None:
        super().__init__(f"{what} refused: {socks.reply_name(code)} ({code:#04x})")
        self.code = code


class NarClient(Protocol):
    """Client side of the NAR negotiation: SOCKS5 greeting, NAR-MODE, NAR commands.

    Replies come back in request order, so each request queues a Deferred and
    a parser for its reply.
    """

    transport: ITCPTransport  # set by makeConnection, before any of our methods run

    def __init__(self, user: str | None = None, password: str | None = None,
                 commands: wire.NarCommands | None = None, mode_command: int = 0x80) -> None:
        self.user = user
        self.password = password
        self.commands = commands or wire.NarCommands(1, 2, 3)
        self.mode_command = mode_command
        self._buf = b""
        self._pending: deque[tuple[Any, defer.Deferred]] = deque()
        self.ready: defer.Deferred = defer.Deferred()
        self.lost: defer.Deferred = defer.Deferred()

    @classmethod
    def connect(cls, reactor: Any, host: str, port: int = 1080, **kw: Any) -> defer.Deferred:
        """Connect and authenticate; fires with the protocol, ready for :meth:`nar_mode`."""
        proto = cls(**kw)

        class _Factory(ClientFactory):
            def buildProtocol(self, addr: Any) -> NarClient:
                return proto

            def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
                if not proto.ready.called:
                    proto.ready.errback(reason)

        reactor.connectTCP(host, port, _Factory(), timeout=10)
        return proto.ready

    # -------------------------------------------------------------- framing
    def connectionMade(self) -> None:
        methods = [METHOD_PASSWORD] if self.user is not None else [METHOD_NONE]
        self.transport.write(socks.encode_method_request(methods))
        self._expect(self._method_reply, defer.Deferred().addCallback(self._method_chosen))

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        while self._pending:
            parser, d = self._pending[0]
            try:
                parsed = parser(self._buf)
            except Exception as e:  # a reply we cannot parse: the session is unusable
                self._fail_all(e)
                self.transport.loseConnection()
                return
            if parsed is None:
                return
            value, used = parsed
            self._buf = self._buf[used:]
            self._pending.popleft()
            d.callback(value)

    def connectionLost(self, reason: Any = None) -> None:
        self._fail_all(ConnectionError("NAR server closed the connection"))
        if not self.lost.called:
            self.lost.callback(None)

    def _fail_all(self, err: Exception) -> None:
        pending, self._pending = self._pending, deque()
        for _, d in pending:
            d.errback(err)
        if not self.ready.called:
            self.ready.errback(err)

    def _expect(self, parser: Any, d: defer.Deferred) -> defer.Deferred:
        self._pending.append((parser, d))
        return d

    # ------------------------------------------------------------ handshake
    @staticmethod
    def _method_reply(buf: bytes) -> tuple[int, int] | None:
        r = socks.parse_method_reply(buf)
        return None if r is None else (r[0], r[1])

    def _method_chosen(self, method: int) -> None:
        if method == METHOD_PASSWORD and self.user is not None:
            self.transport.write(socks.encode_password_request(self.user.encode(),
                                                               (self.password or "").encode()))
            d = self._expect(socks.parse_password_reply, defer.Deferred())
            d.addCallback(self._authenticated)
        elif method == METHOD_NONE:
            self.ready.callback(self)
        else:
            self._fail_all(NarRefused("method negotiation (no acceptable method)",
                                      socks.GENERAL_FAILURE))
            self.transport.loseConnection()

    def _authenticated(self, status: int) -> None:
        if status != 0:
            self._fail_all(NarRefused("authentication", socks.GENERAL_FAILURE))
            self.transport.loseConnection()
        else:
            self.ready.callback(self)

    # -------------------------------------------------------------- NAR API
    def nar_mode(self, remote: str, flags: int = 0) -> defer.Deferred:
        """NAR-MODE towards Yb; fires with (Nb, granted flags)."""
        self.transport.write(socks.encode_request(self.mode_command, remote, 0, flags=flags))

        def check(reply: Any) -> tuple[str, int]:
            if reply.rep != 0:
                raise NarRefused("NAR-MODE", reply.rep)
            return reply.host, reply.flags

        return self._expect(socks.parse_reply, defer.Deferred()).addCallback(check)

    def _command(self, payload: bytes, kind: str, what: str) -> defer.Deferred:
        self.transport.write(payload)

        def check(msg: Any) -> Any:
            if msg.code != 0:
                raise NarRefused(what, msg.code)
            return msg

        return self._expect(lambda b: wire.parse_reply(b, kind), defer.Deferred()).addCallback(check)

    def icmp_associate(self, icmp_id: int = 0) -> defer.Deferred:
        """Fires with the identifier the server confirmed or assigned."""
        d = self._command(wire.encode_icmp(self.commands.icmp, icmp_id), "icmp", "ICMP-ASSOCIATE")
        return d.addCallback(lambda m: m.icmp_id)

    def ipsec_associate(self, protocol: int = 50, spi: int = 0) -> defer.Deferred:
        """Fires with the incoming SPI the server assigned (tell it to Y via IKE or by hand)."""
        d = self._command(wire.encode_ipsec(self.commands.ipsec, protocol, spi), "ipsec", "IPSEC-ASSOCIATE")
        return d.addCallback(lambda m: m.spi)

    def tunnel_associate(self, inner: str, protocol: int = 4) -> defer.Deferred:
        """Fires with the confirmed LTUN.ADDR (X's home/inner address): an IPv4 or IPv6
        address (ATYP 1 / 4; IPv6 needs GRE, 47) or a domain name N resolves (ATYP 3)."""
        try:
            atyp = 4 if ipaddress.ip_address(inner).version == 6 else 1
        except ValueError:
            atyp = 3
        d = self._command(wire.encode_tunnel(self.commands.tunnel, atyp, inner, protocol), "tunnel",
                          "TUNNEL-ASSOCIATE")
        return d.addCallback(lambda m: m.addr)


    def _socks_command(self, cmd: int, host: str, port: int, what: str) -> defer.Deferred:
        self.transport.write(socks.encode_request(cmd, host, port))

        def check(reply: Any) -> tuple[str, int]:
            if reply.rep != 0:
                raise NarRefused(what, reply.rep)
            return reply.host, reply.port

        return self._expect(socks.parse_reply, defer.Deferred()).addCallback(check)

    def bind(self, remote: str = "0.0.0.0", port: int = 0) -> defer.Deferred:
        """TCP mapping (SOCKS BIND in NAR mode): Y at ``remote`` (0.0.0.0: the NAR-MODE
        peer) from ``port`` (0: any) may connect to Nb:P.  Fires with (Nb, P); there is
        no second reply in NAR mode."""
        return self._socks_command(2, remote, port, "BIND")

    def udp_associate(self, port: int = 0) -> defer.Deferred:
        """UDP mapping (SOCKS UDP ASSOCIATE in NAR mode) for Nb:``port`` (0: N chooses;
        N may assign another if it is taken).  Fires with (Nb, P)."""
        return self._socks_command(3, "0.0.0.0", port, "UDP ASSOCIATE")


class BorrowedAddress:
    """X's end of end-to-end NAR: Nb on a TUN device, tunnelled to and from Na.

    ``gre``: the server granted (or imposed) GRE in the NAR-MODE reply; the client MUST
    conform (section 3.1), so packets go to N in GRE, else IP-in-IP (2.5).  What N
    delivers is accepted in either."""

    def __init__(self, lent: str, remote: str, server_private: str, reactor: Any = None,
                 tun_name: bytes = b"narc%d", extra_routes: tuple[str, ...] = (),
                 gre: bool = False) -> None:
        from narsuite.packet.rawsock import IPPROTO_GRE, IPPROTO_IPIP, RawSocketPort
        from narsuite.packet.tun import TunDevice

        self.lent, self.remote, self.na = lent, remote, server_private
        self.lent_b = socket.inet_aton(lent)
        self.na_b = socket.inet_aton(server_private)
        self.counters = {"to_n": 0, "from_n": 0, "dropped": 0}
        self.tun = TunDevice(tun_name, self._from_kernel, addresses=[f"{lent}/32"],
                             routes=[f"{remote}/32", *extra_routes], reactor=reactor)
        self.ipip = RawSocketPort(IPPROTO_IPIP, self._from_n, reactor=reactor)
        self.gre = RawSocketPort(IPPROTO_GRE, self._from_n, reactor=reactor)
        self.xa_b: bytes | None = None
        self.gre_mode = gre

    def start(self) -> None:
        self.tun.start()
        self.ipip.start()
        self.gre.start()

    def stop(self) -> defer.Deferred:
        self.ipip.stop()
        self.gre.stop()
        return defer.maybeDeferred(self.tun.stop)

    def _from_kernel(self, packet: bytes) -> None:
        """A packet from a local program (source Nb) on its way to Y: tunnel it to Na."""
        if packet[12:16] != self.lent_b:
            self.counters["dropped"] += 1
            return
        if self.xa_b is None:
            self.xa_b = socket.inet_aton(source_address(self.na))
        if self.gre_mode:
            self.gre.send_packet(codec.gre_encapsulate(packet, self.xa_b, self.na_b))
        else:
            self.ipip.send_packet(codec.ipip_encapsulate(packet, self.xa_b, self.na_b))
        self.counters["to_n"] += 1

    def _from_n(self, packet: bytes, src: str) -> None:
        """What N delivered: decapsulate (IP-in-IP or GRE from Na) and hand it to the kernel."""
        if src != self.na:
            self.counters["dropped"] += 1
            return
        try:
            _proto, _key, inner = codec.decapsulate(packet)
        except codec.CodecError:
            self.counters["dropped"] += 1
            return
        self.tun.write(inner)
        self.counters["from_n"] += 1




def _tunnel_arg(item: str) -> tuple[str, str]:
    """``XB[:4|47]``; an IPv6 XB with a protocol is written ``[XB]:47``."""
    if item.startswith("["):
        inner, _, rest = item[1:].partition("]")
        return inner, rest.lstrip(":")
    if item.count(":") > 1:  # a bare IPv6 address
        return item, ""
    inner, _, p = item.partition(":")
    return inner, p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="narsuite-nar-client", description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", required=True, help="N's address on X's side (Na)")
    ap.add_argument("--port", type=int, default=1080)
    ap.add_argument("--user")
    ap.add_argument("--password")
    ap.add_argument("--remote", required=True, help="Yb, the peer outside")
    ap.add_argument("--translated", action="store_true", help="ask for translated delivery")
    ap.add_argument("--gre", action="store_true", help="ask for GRE instead of IP-in-IP")
    ap.add_argument("--mode-command", type=lambda v: int(v, 0), default=0x80)
    ap.add_argument("--icmp", type=int, metavar="ID", action="append", default=[],
                    help="ICMP-ASSOCIATE proposing ID (0: let the server choose)")
    ap.add_argument("--ipsec", choices=("esp", "ah"), action="append", default=[])
    ap.add_argument("--tunnel", action="append", default=[], metavar="XB[:4|47]",
                    help="TUNNEL-ASSOCIATE for inner address XB (IPv4, IPv6 with GRE, or a name "
                         "N resolves), IP-in-IP (4, default) or GRE (47)")
    ap.add_argument("--bind-tcp", type=int, metavar="YPORT", action="append", default=[],
                    help="TCP mapping (BIND): Y may connect from YPORT (0: any) to Nb:P")
    ap.add_argument("--udp", type=int, metavar="PORT", action="append", default=[],
                    help="UDP mapping (UDP ASSOCIATE) for Nb:PORT (0: N chooses)")
    ap.add_argument("--tun", action="store_true", help="carry Nb on a TUN device (end-to-end mode)")
    args = ap.parse_args(argv)

    from twisted.internet import reactor

    result: dict[str, Any] = {}
    state: dict[str, Any] = {}

    @defer.inlineCallbacks
    def run():
        proto = yield NarClient.connect(reactor, args.server, args.port, user=args.user,
                                        password=args.password, mode_command=args.mode_command)
        flags = (wire.FLAG_TRANSLATED if args.translated else 0) | (wire.FLAG_GRE if args.gre else 0)
        lent, granted = yield proto.nar_mode(args.remote, flags)
        result.update(lent=lent, translated=bool(granted & wire.FLAG_TRANSLATED),
                      gre=bool(granted & wire.FLAG_GRE), icmp=[], ipsec=[], tunnel=[], tcp=[],
                      udp=[])
        for ident in args.icmp:
            result["icmp"].append((yield proto.icmp_associate(ident)))
        for kind in args.ipsec:
            spi = yield proto.ipsec_associate(50 if kind == "esp" else 51)
            result["ipsec"].append({"protocol": kind, "spi": spi})
        for item in args.tunnel:
            inner, p = _tunnel_arg(item)
            result["tunnel"].append((yield proto.tunnel_associate(inner, int(p or 4))))
        for yport in args.bind_tcp:
            result["tcp"].append((yield proto.bind(args.remote, yport))[1])
        for port in args.udp:
            result["udp"].append((yield proto.udp_associate(port))[1])
        if args.tun and not result["translated"]:
            state["borrowed"] = b = BorrowedAddress(lent, args.remote, args.server, reactor,
                                                    gre=result["gre"])
            b.start()
            result["tun"] = b.tun.ifname
        print(json.dumps(result), flush=True)
        yield proto.lost
        print(json.dumps({"closed": True}), flush=True)

    def failed(f: Any) -> None:
        print(json.dumps({"error": f.getErrorMessage()}), flush=True)
        state["rc"] = 1
        if reactor.running:
            reactor.stop()

    def done(_: Any) -> None:
        if reactor.running:
            reactor.stop()

    reactor.callWhenRunning(lambda: run().addCallbacks(done, failed))

    def cleanup() -> defer.Deferred | None:
        b = state.get("borrowed")
        return b.stop() if b is not None else None

    reactor.addSystemEventTrigger("before", "shutdown", cleanup)
    reactor.run()
    return state.get("rc", 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
