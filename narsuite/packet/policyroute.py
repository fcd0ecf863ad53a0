"""Policy routing (``ip rule``) over rtnetlink with pyroute2, off the reactor thread.

The esp role sends our traffic for a transport-mode peer into its TUN by rules that
pick a routing table by destination, protocol and source port.  They change when a
peer appears or moves -- from a store subscription, i.e. on the reactor thread -- so
the netlink work runs in the reactor's thread pool, one change after another (a
rule removed before its replacement is added), and a failure is logged, never
raised into the store's callback.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from narsuite.logs import logger

__all__ = ["Rule", "PolicyRoutes", "MAIN_TABLE"]

log = logger()

MAIN_TABLE = 254
_PROTO_NAMES = {socket.IPPROTO_UDP: "udp", socket.IPPROTO_TCP: "tcp", socket.IPPROTO_ICMP: "icmp"}


@attrs.frozen
class Rule:
    """One policy rule: traffic ``to`` (a prefix) [of ``ip_proto`` [from ``sport``]] looks
    up ``table``, at ``priority``."""

    priority: int
    to: str  # "a.b.c.d/n"
    table: int
    ip_proto: int = 0
    sport: int = 0

    def netlink(self) -> dict[str, Any]:
        """pyroute2 ``IPRoute.rule`` keywords."""
        dst, _, plen = self.to.partition("/")
        kw: dict[str, Any] = {"family": socket.AF_INET, "priority": self.priority, "dst": dst,
                              "dst_len": int(plen or 32), "table": self.table}
        if self.ip_proto:
            kw["ip_proto"] = self.ip_proto
            if self.sport:
                kw["sport_range"] = f"{self.sport}:{self.sport}"
        return kw

    def __str__(self) -> str:
        """As ``ip rule`` would write it (for logs)."""
        out = f"priority {self.priority} to {self.to}"
        if self.ip_proto:
            out += f" ipproto {_PROTO_NAMES.get(self.ip_proto, self.ip_proto)}"
            if self.sport:
                out += f" sport {self.sport}"
        return out + f" lookup {'main' if self.table == MAIN_TABLE else self.table}"


class PolicyRoutes:
    """Rules and a table's default route, changed in order in a worker thread.

    ``run(f)`` runs ``f`` somewhere and returns a Deferred of its result; the default is
    the reactor's thread pool.  ``ipr`` makes the netlink socket (pyroute2 ``IPRoute``).
    """

    def __init__(self, reactor: Any = None, run: Callable[[Callable[[], Any]], defer.Deferred] | None = None,
                 ipr: Callable[[], Any] | None = None) -> None:
        if run is None:
            if reactor is None:
                from twisted.internet import reactor as default_reactor

                reactor = default_reactor
            r = reactor
            run = lambda f: deferToThreadPool(r, r.getThreadPool(), f)  # noqa: E731
        self._run = run
        self._ipr = ipr
        self._tail: defer.Deferred = defer.succeed(None)

    def change(self, remove: Iterable[Rule] = (), add: Iterable[Rule] = (),
               default_route: tuple[int, str] | None = None) -> defer.Deferred:
        """Remove rules, set ``default_route`` = (table, device), add rules -- after every
        earlier change.  Fires when done; failures are logged here and fire as None."""
        remove, add = list(remove), list(add)

        def work() -> None:
            self._apply(remove, add, default_route)

        def failed(f: Any) -> None:
            log.failure("policy routing: removing {old} / adding {new} failed", f,
                        old=", ".join(map(str, remove)) or "-", new=", ".join(map(str, add)) or "-")

        finished: defer.Deferred = defer.Deferred()
        # the chain's tail: the next change starts after this one, success or not
        self._tail = self._tail.addCallback(lambda _: self._run(work)).addErrback(failed)
        self._tail.addCallback(lambda _: finished.callback(None))
        return finished

    def _open(self) -> Any:
        if self._ipr is not None:
            return self._ipr()
        from pyroute2 import IPRoute

        return IPRoute()

    def _apply(self, remove: list[Rule], add: list[Rule], default_route: tuple[int, str] | None) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        ipr = self._open()
        try:
            for rule in remove:
                try:
                    ipr.rule("del", **rule.netlink())
                except NetlinkError as e:
                    if e.code != errno.ENOENT:
                        raise
            if default_route is not None:
                table, device = default_route
                found = ipr.link_lookup(ifname=device)
                if not found:
                    raise LookupError(f"no link named {device!r} for table {table}'s default route")
                ipr.route("replace", dst="0.0.0.0/0", oif=found[0], table=table)
            for rule in add:
                try:
                    ipr.rule("add", **rule.netlink())
                except NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise
        finally:
            ipr.close()
