"""A SOCKS worker process of the nar role (``python -m narsuite.nar.worker``).

Started by :class:`narsuite.nar.workers.WorkerPool`, never by hand: it reads
``{"config": <NarConfig as JSON>, "control": <UNIX socket>, "log_level": ...}``
from stdin, connects to the main process's control socket, then listens on
the SOCKS port with ``SO_REUSEPORT`` and serves CONNECT, BIND and UDP
ASSOCIATE with the same config.  NAR-MODE connections are handed to the main
process (see :mod:`narsuite.nar.workers`).  No store, no other service.  It
exits when the control channel closes (the main process is gone) or on SIGTERM.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from typing import Any

from twisted.internet import error, protocol, tcp
from twisted.internet.interfaces import IReactorSocket, IReactorUNIX, IUNIXTransport
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from narsuite import logs, schema
from narsuite.logs import logger
from narsuite.nar import socks
from narsuite.nar.config import NarConfig
from narsuite.nar.fastio import lean_accepts
from narsuite.nar.server import SocksFactory, SocksProtocol
from narsuite.nar.workers import COUNTERS_INTERVAL, ChannelCodec, reuseport_socket

log = logger("narsuite.nar.worker")


class WorkerChannel(protocol.Protocol):
    """The worker's end of the control channel: hands over NAR-MODE, reports counters."""

    transport: IUNIXTransport  # passes descriptors (sendFileDescriptor); set before connectionMade

    def __init__(self, socks_factory: SocksFactory, reactor: Any) -> None:
        self.socks = socks_factory
        self.reactor = reactor
        self.codec = ChannelCodec()
        self.pending: dict[int, int] = {}  # handoff id -> our copy of the descriptor
        self.next_id = 0
        self.loop: LoopingCall | None = None
        self.up = False
        self.on_up: Any = None  # called once the channel is connected (then we listen)

    def connectionMade(self) -> None:
        self.up = True
        self.send({"type": "hello", "pid": os.getpid()})
        self.loop = LoopingCall(self.report)
        self.loop.clock = self.reactor
        self.loop.start(COUNTERS_INTERVAL, now=True)
        if self.on_up is not None:
            self.on_up()

    def send(self, msg: dict[str, Any]) -> None:
        self.transport.write(ChannelCodec.encode(msg))

    def report(self) -> None:
        self.send({"type": "counters", "pid": os.getpid(), "counters": self.socks.counters})

    def handoff(self, proto: SocksProtocol) -> None:
        """Pass ``proto``'s connection to the main process and forget it here."""
        t = proto.transport
        if not self.up or not isinstance(t, tcp.Connection) or t.disconnecting:
            proto.state = "request"
            proto._reply(socks.GENERAL_FAILURE)
            return
        # Reply bytes Twisted has not sent yet (e.g. the auth reply of a pipelining client).
        out = bytes(t.dataBuffer[t.offset:]) + b"".join(t._tempDataBuffer)
        family = t.socket.family
        fd = os.dup(t.fileno())
        self.reactor.removeReader(t)
        self.reactor.removeWriter(t)
        t.socket.close()  # no shutdown(): the connection lives on in the duplicate
        t.connected = False
        t.disconnected = True
        proto.connectionLost(Failure(error.ConnectionDone()))
        self.next_id += 1
        self.pending[self.next_id] = fd
        self.socks.count("nar_handoffs_out")
        self.transport.sendFileDescriptor(fd)
        self.send({"type": "handoff", "id": self.next_id, "family": int(family),
                   "user": proto.user, "data": base64.b64encode(bytes(proto.buf)).decode(),
                   "out": base64.b64encode(out).decode()})

    def dataReceived(self, data: bytes) -> None:
        for msg in self.codec.feed(data):
            if msg.get("type") == "ack":
                handoff_id = msg.get("id")
                fd = self.pending.pop(handoff_id, None) if isinstance(handoff_id, int) else None
                if fd is not None:
                    os.close(fd)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.up = False
        if self.loop is not None and self.loop.running:
            self.loop.stop()
        for fd in self.pending.values():
            os.close(fd)
        self.pending.clear()
        log.info("nar worker {pid}: control channel closed; exiting", pid=os.getpid())
        if self.reactor.running:
            self.reactor.stop()


def main() -> None:
    spec = json.loads(sys.stdin.buffer.read())
    if spec.get("lean_reactor"):
        from narsuite import reactor as lean

        lean.install()
    else:
        from twisted.internet import epollreactor

        epollreactor.install()
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    logs.set_level(spec.get("log_level", "info"))
    config = schema.build(NarConfig, spec["config"], "nar")
    factory = SocksFactory(config, None, None, reactor)
    factory.noisy = False
    channel = WorkerChannel(factory, reactor)
    factory.handoff = channel.handoff if config.nar.enabled else None

    def connected() -> None:
        try:
            s = reuseport_socket(config.listen, config.port)
        except OSError as e:
            failed(Failure(e))
            return
        try:
            # Twisted types the factory as ServerFactory[_ProtoWithFactory], and Factory's
            # parameter is invariant, so no ServerFactory[SomeProtocol] matches.
            lean_accepts(IReactorSocket(reactor).adoptStreamPort(s.fileno(), s.family, factory))  # type: ignore[arg-type]
        finally:
            s.close()  # the reactor holds its own descriptor

    channel.on_up = connected

    def failed(f: Failure) -> None:
        log.error("nar worker {pid}: cannot start: {e}", pid=os.getpid(), e=f.value)
        if reactor.running:
            reactor.stop()

    class _F(protocol.ClientFactory):
        noisy = False

        def buildProtocol(self, addr: Any) -> WorkerChannel:
            return channel

        def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
            failed(reason)

    def start() -> None:
        IReactorUNIX(reactor).connectUNIX(spec["control"], _F())

    reactor.callWhenRunning(start)
    reactor.run()


if __name__ == "__main__":
    main()
