"""narsuite.packet.rtnl: the struct-built route requests the esp role makes per peer.

pyroute2 (an independent netlink implementation) is the oracle for the bytes; a lab
namespace and ``ip route`` for what the kernel does with them."""

from __future__ import annotations

import errno
import struct
import sys
from pathlib import Path

import pytest

from narsuite.packet import rtnl


def _pyroute2_bytes(msg_type: int, seq: int, dst: str, oif: int) -> bytes:
    """The same request encoded by pyroute2's rtmsg, with the fields our request sets."""
    from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST
    from pyroute2.netlink.rtnl.rtmsg import rtmsg

    address, _, plen = dst.partition("/")
    msg = rtmsg()
    msg["family"] = 2
    msg["dst_len"] = int(plen)
    msg["table"] = 254
    msg["proto"] = 4
    msg["scope"] = 0
    msg["type"] = 1
    msg["attrs"] = [("RTA_DST", address), ("RTA_OIF", oif)]
    msg["header"]["type"] = msg_type
    flags = NLM_F_REQUEST | NLM_F_ACK
    if msg_type == rtnl.RTM_NEWROUTE:
        flags |= NLM_F_CREATE | NLM_F_REPLACE
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg["header"]["pid"] = 0
    msg.encode()
    return bytes(msg.data)


@pytest.mark.parametrize("msg_type", [rtnl.RTM_NEWROUTE, rtnl.RTM_DELROUTE])
@pytest.mark.parametrize("dst", ["10.128.3.7/32", "10.1.0.0/24", "0.0.0.0/0"])
def test_request_bytes_match_pyroute2(msg_type: int, dst: str) -> None:
    assert rtnl.route_request(msg_type, 77, dst, 12) == _pyroute2_bytes(msg_type, 77, dst, 12)


def test_bad_prefix_length_is_refused() -> None:
    with pytest.raises(ValueError, match="prefix length"):
        rtnl.route_request(rtnl.RTM_NEWROUTE, 1, "10.0.0.0/33", 1)


def _error_msg(seq: int, error: int) -> bytes:
    inner = struct.pack("=IHHII", 16, 24, 5, seq, 0)
    return struct.pack("=IHHII", 16 + 4 + 16, rtnl.NLMSG_ERROR, 0, seq, 1234) + struct.pack("=i", error) + inner


def test_parse_ack_finds_its_sequence_number() -> None:
    data = _error_msg(4, -errno.EEXIST) + _error_msg(5, 0)
    assert rtnl.parse_ack(data, 5) == 0
    assert rtnl.parse_ack(data, 4) == errno.EEXIST
    assert rtnl.parse_ack(data, 6) is None          # a stale answer is not ours
    assert rtnl.parse_ack(b"\0" * 8, 1) is None     # truncated
    assert rtnl.parse_ack(struct.pack("=IHHII", 0, 2, 0, 1, 0), 1) is None  # zero length: no loop


CHILD = r"""
import errno, subprocess
from narsuite.packet.rtnl import RouteSocket, NetlinkError
subprocess.run(["ip", "link", "add", "rq0", "type", "veth", "peer", "name", "rq1"], check=True)
subprocess.run(["ip", "link", "set", "rq0", "up"], check=True)
idx = int(open("/sys/class/net/rq0/ifindex").read())
rs = RouteSocket()
for i in range(50):
    rs.replace(f"10.66.0.{i}/32", idx)
rs.replace("10.66.0.3/32", idx)           # replace: no EEXIST
rs.replace("10.67.0.0/16", idx)
rs.delete("10.66.0.7/32", idx)
for call in (lambda: rs.delete("10.66.0.7/32", idx), lambda: rs.replace("10.66.9.9/32", 99999)):
    try:
        call()
    except NetlinkError as e:
        print("error", errno.errorcode[e.code])
rs.replace("10.66.0.200/32", idx)         # the socket still works after refusals
print("done")
"""


def test_routes_reach_the_kernel_and_refusals_carry_the_errno(lab) -> None:
    h = lab.host("h")
    root = Path(__file__).resolve().parent.parent
    out = h.run(["env", f"PYTHONPATH={root}", sys.executable, "-c", CHILD], check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split("\n")[:3] == ["error ESRCH", "error ENODEV", "done"]
    shown = h.run(["ip", "-4", "route", "show", "dev", "rq0", "proto", "static"]).stdout.split("\n")
    dsts = {line.split()[0] for line in shown if line.strip()}
    assert dsts == {f"10.66.0.{i}" for i in range(50) if i != 7} | {"10.67.0.0/16", "10.66.0.200"}
