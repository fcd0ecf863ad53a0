"""narsuite.packet.policyroute: rules in order, off the caller's thread, failures logged.

The rules themselves are checked against the kernel by the esp role's transport-mode lab
tests (tests/test_esp_role.py), which need them to carry traffic.
"""

from __future__ import annotations

import errno
import socket

from pyroute2.netlink.exceptions import NetlinkError
from twisted.internet import defer

from narsuite.packet.policyroute import MAIN_TABLE, PolicyRoutes, Rule


class FakeIPRoute:
    def __init__(self, log: list, fail: dict | None = None) -> None:
        self.log, self.fail = log, fail or {}

    def rule(self, command: str, **kw):
        self.log.append(("rule", command, kw))
        code = self.fail.get(command)
        if code:
            raise NetlinkError(code)

    def link_lookup(self, ifname: str):
        return [7] if ifname == "esp0" else []

    def route(self, command: str, **kw):
        self.log.append(("route", command, kw))

    def close(self) -> None:
        self.log.append(("close",))


def test_rule_keywords_and_text():
    r = Rule(1000, "198.51.100.7/32", MAIN_TABLE, socket.IPPROTO_UDP, 4500)
    assert r.netlink() == {"family": socket.AF_INET, "priority": 1000, "dst": "198.51.100.7", "dst_len": 32,
                           "table": 254, "ip_proto": 17, "sport_range": "4500:4500"}
    assert str(r) == "priority 1000 to 198.51.100.7/32 ipproto udp sport 4500 lookup main"
    assert Rule(1001, "10.0.0.0/8", 220).netlink() == {"family": socket.AF_INET, "priority": 1001,
                                                       "dst": "10.0.0.0", "dst_len": 8, "table": 220}


def test_changes_run_in_order_in_the_worker_and_tolerate_what_is_already_so():
    calls: list = []
    ran: list = []

    def run(f):
        ran.append(f)
        return defer.maybeDeferred(f)

    routes = PolicyRoutes(run=run, ipr=lambda: FakeIPRoute(calls, {"del": errno.ENOENT, "add": errno.EEXIST}))
    old = [Rule(1001, "198.51.100.7/32", 220)]
    new = [Rule(1001, "198.51.100.8/32", 220)]
    d = routes.change(remove=old, add=new, default_route=(220, "esp0"))
    assert len(ran) == 1 and d.called
    assert [c[:2] for c in calls] == [("rule", "del"), ("route", "replace"), ("rule", "add"), ("close",)]
    assert calls[1][2] == {"dst": "0.0.0.0/0", "oif": 7, "table": 220}


def test_a_failure_is_logged_and_the_next_change_still_runs():
    calls: list = []
    pending: list[defer.Deferred] = []

    def run(f):
        d = defer.Deferred()
        pending.append((d, f))
        return d

    routes = PolicyRoutes(run=run, ipr=lambda: FakeIPRoute(calls, {"add": errno.EPERM}))
    first = routes.change(add=[Rule(1001, "198.51.100.7/32", 220)])
    second = routes.change(remove=[Rule(1001, "198.51.100.7/32", 220)])
    assert len(pending) == 1, "the second change must wait for the first"
    d, f = pending.pop()
    try:
        f()
    except NetlinkError as e:
        d.errback(e)
    assert first.called and first.result is None  # logged, not raised
    assert len(pending) == 1
    d, f = pending.pop()
    d.callback(f())
    assert second.called
    assert [c[:2] for c in calls] == [("rule", "add"), ("close",), ("rule", "del"), ("close",)]
