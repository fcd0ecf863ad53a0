"""NetlinkConfigurator looks a device's index up once, and again only when the device was
re-created under the same name (ENODEV): a route per new peer no longer pays a link dump."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from narsuite.packet.tun import NetlinkConfigurator


class CountingIPR:
    """Wraps a real pyroute2 IPRoute and counts its link dumps."""

    def __init__(self, ipr) -> None:
        self._ipr = ipr
        self.lookups = 0

    def link_lookup(self, **kw):
        self.lookups += 1
        return self._ipr.link_lookup(**kw)

    def __getattr__(self, name):
        return getattr(self._ipr, name)


def _routes(host, dev: str) -> set[str]:
    out = host.run(["ip", "-4", "route", "show", "dev", dev]).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


CHILD = r"""
import subprocess, sys
from pyroute2 import IPRoute
from narsuite.packet.tun import NetlinkConfigurator
from tests.test_netlink_index_cache import CountingIPR

nl = NetlinkConfigurator()
counting = CountingIPR(IPRoute())
nl._ipr = counting
def veth():
    subprocess.run(["ip", "link", "add", "cq0", "type", "veth", "peer", "name", "cq1"], check=True)
    subprocess.run(["ip", "link", "set", "cq0", "up"], check=True)
veth()
for i in range(20):
    nl.add_route("cq0", f"10.66.0.{i}/32")
print("lookups-after-20", counting.lookups)
# the device goes and comes back under the same name: a new index
subprocess.run(["ip", "link", "del", "cq0"], check=True)
veth()
nl.add_route("cq0", "10.66.1.1/32")
print("lookups-after-recreate", counting.lookups)
nl.remove_route("cq0", "10.66.1.1/32")
nl.add_route("cq0", "10.66.1.2/32")
print("lookups-end", counting.lookups)
"""


def test_index_is_cached_and_refreshed_when_the_device_is_recreated(lab) -> None:
    h = lab.host("h")
    root = Path(__file__).resolve().parent.parent
    out = h.run(["env", f"PYTHONPATH={root}", sys.executable, "-c", CHILD], check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    counts = dict(line.split() for line in out.stdout.splitlines())
    assert counts["lookups-after-20"] == "1"          # one dump for twenty routes
    assert counts["lookups-after-recreate"] == "2"    # ENODEV: looked up again, route added
    assert counts["lookups-end"] == "2"
    assert _routes(h, "cq0") == {"10.66.1.2"}


def test_a_missing_device_is_a_lookup_error() -> None:
    class Empty:
        def link_lookup(self, **kw):
            return []

    nl = NetlinkConfigurator()
    nl._ipr = Empty()
    with pytest.raises(LookupError, match="nope"):
        nl.add_route("nope", "10.0.0.0/8")
