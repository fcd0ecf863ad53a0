"""Twisted's private attributes narsuite relies on, in one list, and a check for them.

Two hot paths reach under Twisted's public API for speed (their docstrings say what
each saves): :mod:`narsuite.reactor` replaces ``EPollReactor.doPoll`` and uses the
reactor's poller, selectable table and dispatch helpers; :mod:`narsuite.nar.fastio`
writes straight to an idle ``tcp.Connection``'s socket and builds connections
without ``tcp.Client``.  Private names can vanish in any Twisted release, so
setup.cfg bounds the Twisted version to the releases this list was checked
against, and ``tests/test_twisted_private.py`` runs :func:`missing` so that an
upgrade which drops one fails with the names, not with an AttributeError deep in
a relay.
"""

from __future__ import annotations

import importlib
from typing import cast

__all__ = ["REQUIRED", "missing", "check"]

#: (module, object path, attribute) -- "object path" empty for a module-level name.
#: Instance attributes set in ``__init__`` are checked on a real instance by the test.
REQUIRED: tuple[tuple[str, str, str], ...] = (
    ("twisted.internet.posixbase", "", "_NO_FILEDESC"),
    ("twisted.internet.epollreactor", "EPollReactor", "_doReadOrWrite"),
    ("twisted.internet.epollreactor", "EPollReactor", "_disconnectSelectable"),
    ("twisted.internet.epollreactor", "EPollReactor", "doPoll"),
    ("twisted.internet.tcp", "Connection", "_getLogPrefix"),
    ("twisted.internet.tcp", "Connection", "TLS"),
    ("twisted.internet.abstract", "FileDescriptor", "_writeDisconnected"),
    ("twisted.internet.abstract", "FileDescriptor", "offset"),
    ("twisted.internet.abstract", "FileDescriptor", "dataBuffer"),
    # narsuite.nar.fastio.LeanServer / OutgoingConnection / lean_accepts, nar.role.SocksTCPServer
    ("twisted.internet.tcp", "_SocketCloser", "_shouldShutdown"),
    ("twisted.internet.tcp", "Port", "transport"),
    ("twisted.internet.tcp", "Port", "_realPortNumber"),
    ("twisted.application.internet", "_AbstractServer", "_getPort"),
)

#: Attributes a ``tcp.Connection`` instance must have (``_tempDataLen`` is set in ``__init__``).
CONNECTION_INSTANCE: tuple[str, ...] = ("_tempDataLen", "dataBuffer", "offset", "_writeDisconnected", "TLS")

#: Attributes an ``EPollReactor`` instance must have (set in its ``__init__``).
REACTOR_INSTANCE: tuple[str, ...] = ("_poller", "_selectables")


def missing() -> list[str]:
    """The required private names this Twisted does not have (``[]`` when all are there)."""
    gone = []
    for modname, path, attr in REQUIRED:
        try:
            obj: object = importlib.import_module(modname)
        except ImportError:
            gone.append(modname)
            continue
        for part in filter(None, path.split(".")):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is None or not hasattr(obj, attr):
            gone.append(f"{modname}.{path + '.' if path else ''}{attr}")
    gone.extend("twisted.internet.tcp.Connection()." + a for a in _connection_instance_missing())
    return gone


class _NoReactor:
    """Stands in for a reactor: the instance is inspected, never run."""


def _connection_instance_missing() -> list[str]:
    import socket

    from twisted.internet import tcp
    from twisted.internet.interfaces import IReactorFDSet
    from twisted.internet.protocol import Protocol

    with socket.socket() as s:
        try:
            # not None: FileDescriptor would import (and so install) the default reactor;
            # a stand-in on purpose (the cast), as the connection is only looked at
            conn = tcp.Connection(s, Protocol(), cast("IReactorFDSet", _NoReactor()))
        except Exception:  # a changed constructor: everything the fast path reads is suspect
            return list(CONNECTION_INSTANCE)
        return [a for a in CONNECTION_INSTANCE if not hasattr(conn, a)]


def check() -> None:
    """Raise ``RuntimeError`` naming every missing private attribute and the Twisted version."""
    gone = missing()
    if gone:
        from twisted import version

        raise RuntimeError(
            f"Twisted {version.short()} lacks private attributes narsuite's fast paths use: "
            f"{', '.join(gone)}. Install a Twisted within setup.cfg's bound, or update "
            "narsuite/reactor.py and narsuite/nar/fastio.py (see narsuite/twisted_private.py).")
