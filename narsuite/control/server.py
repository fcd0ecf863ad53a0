"""The control socket: JSON lines over a UNIX socket, owner-only.

The protocol only frames: one JSON object per line in, one per line out.
``{"argv": ["list", "store.lease"]}`` is answered with
``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "..."}``.
The socket file is mode 0600 and, on top of that, the peer's credentials
(SO_PEERCRED) must be root's or the daemon's own uid.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.application import internet
from twisted.internet import defer
from twisted.internet.interfaces import IUNIXTransport
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

from narsuite.control.commands import CommandError, jsonable
from narsuite.logs import logger

if TYPE_CHECKING:
    from narsuite.service import NarsuiteService

__all__ = ["ControlProtocol", "ControlFactory", "make_control_service", "peer_uid"]

log = logger()


def peer_uid(transport: Any) -> int | None:
    """The uid of the process at the other end of a UNIX socket (Linux SO_PEERCRED)."""
    try:
        sock = transport.getHandle()
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class ControlProtocol(LineOnlyReceiver):
    transport: IUNIXTransport  # the control socket; set by makeConnection before connectionMade
    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024

    def connectionMade(self) -> None:
        uid = peer_uid(self.transport)
        if uid is not None and uid not in (0, os.getuid()):
            log.warn("control: refused a client with uid {uid}", uid=uid)
            self._send({"ok": False, "error": "permission denied"})
            self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._send({"ok": False, "error": f"request longer than {self.MAX_LENGTH} bytes"})
        self.transport.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        try:
            request = json.loads(line)
            argv = request["argv"]
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            self._send({"ok": False, "error": 'expected one JSON object per line: {"argv": [...]}'})
            return
        d = defer.maybeDeferred(self.factory.dispatch, argv)
        d.addCallbacks(lambda result: self._send({"ok": True, "result": jsonable(result)}),
                       self._failed, errbackArgs=(argv,))

    def _failed(self, failure, argv):
        if failure.check(CommandError):
            self._send({"ok": False, "error": str(failure.value)})
        else:
            log.failure("control: {argv} failed", failure, argv=" ".join(argv))
            self._send({"ok": False, "error": f"internal error: {failure.getErrorMessage()}"})

    def _send(self, obj: dict) -> None:
        self.sendLine(json.dumps(obj, default=str).encode())


class ControlFactory(Factory):
    protocol = ControlProtocol

    def __init__(self, daemon: NarsuiteService) -> None:
        self.daemon = daemon

    def dispatch(self, argv: list[str]) -> Any:
        command, args = self.daemon.commands.resolve(argv)
        self.daemon.control_requests.labels(command.name).inc()
        return command.handler(self.daemon, **args)


def make_control_service(daemon: NarsuiteService, path: Path) -> internet.UNIXServer:
    path.parent.mkdir(parents=True, exist_ok=True)
    svc = internet.UNIXServer(str(path), ControlFactory(daemon), mode=0o600, wantPID=True)
    svc.setName("control")
    return svc
