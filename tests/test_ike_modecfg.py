"""XAUTH and mode-config (narsuite.ike.modecfg): the transaction conversation a strongSwan
5.9 client (xauth-generic, pull by default, push with ``pull = no``) has with us.

Payloads are built the way strongSwan builds them (read from its xauth.c, xauth_generic.c,
mode_config.c and the unity plugin): identifier 0 in the XAUTH reply and the mode-config
ack, an empty-TLV XAUTH_STATUS in the XAUTH ack, an empty INTERNAL_IP4_ADDRESS in the
request.  The password checker is the real one (bcrypt cost 4, verified synchronously);
leases come from a real Store with a memory backend.  Wire encodings are checked byte for
byte against the drafts' layouts and, as an independent reader, by tshark's ISAKMP dissector
(scapy 2.x has no Attribute payload).
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from ipaddress import IPv4Address, IPv4Network

import pytest
from test_store import ok  # the result of an already-fired Deferred
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from narsuite.ike import constants as C
from narsuite.ike import isakmp as I
from narsuite.ike.modecfg import (
    CONFIG,
    DONE,
    FAILED,
    XAUTH,
    RemoteAccessPolicy,
    TransactionError,
    TransactionServer,
    is_response,
    split_include_networks,
)
from narsuite.passwords import PasswordChecker, hash_password
from narsuite.store import MemoryBackend, Store
from narsuite.store.core import Exhausted

A = I.Attribute
P = I.AttributePayload

USERS = {"alice": hash_password("wonderland", cost=4), "bob": hash_password("builder", cost=4)}


@pytest.fixture(scope="module")
def checker() -> PasswordChecker:
    return PasswordChecker(USERS, run=lambda f, *a: defer.maybeDeferred(f, *a))


@pytest.fixture
def store():
    clock = Clock()
    s = Store(MemoryBackend(), clock)
    s.add_pool("ra", IPv4Network("10.8.0.0/29"), [IPv4Address("10.8.0.1")])  # gateway excluded
    s.open()
    s.start()
    yield s
    s.stop()


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


POLICY = RemoteAccessPolicy(xauth=True, pool="ra", dns=("10.8.0.1", "192.0.2.53"),
                            split_include=("10.0.0.0/8", "172.16.0.0/12"), xauth_retries=2)


def server(store, checker, policy=POLICY, owner="ike-sa-1", **kw) -> TransactionServer:
    return TransactionServer.for_store(policy, store, owner, peer_name=owner,
                                       check_password=lambda u, p: checker.check(u.encode(), p), **kw)


def xauth_reply(user: bytes, password: bytes, identifier: int = 0) -> I.AttributePayload:
    """strongSwan's xauth_generic reply: identifier 0, name and password as TLVs."""
    return P(C.CFG_REPLY, identifier, [A(C.XAUTH_USER_NAME, user), A(C.XAUTH_USER_PASSWORD, password)])


XAUTH_ACK = P(C.CFG_ACK, 0, [A(C.XAUTH_STATUS, b"")])  # strongSwan: empty TLV, identifier echoed or 0


def strongswan_request(identifier: int = 0x4242, address: bytes = b"", unity: bool = True) -> I.AttributePayload:
    attributes = [A(C.INTERNAL_IP4_ADDRESS, address), A(C.INTERNAL_IP4_DNS, b""), A(C.INTERNAL_IP4_NBNS, b"")]
    if unity:
        attributes += [A(C.UNITY_SPLIT_INCLUDE, b""), A(C.UNITY_LOCAL_LAN, b""), A(C.UNITY_BANNER, b"")]
    return P(C.CFG_REQUEST, identifier, attributes)


def values(payload: I.AttributePayload, type: int) -> list:
    return [a.value for a in payload.attributes if a.type == type]


def login(t: TransactionServer, user=b"alice", password=b"wonderland") -> None:
    [req] = ok(t.start())
    [status] = ok(t.received(xauth_reply(user, password)))
    assert status.get(C.XAUTH_STATUS).value == C.XAUTH_STATUS_OK
    assert ok(t.received(P(C.CFG_ACK, status.identifier, [A(C.XAUTH_STATUS, b"")]))) == []


# -- XAUTH -----------------------------------------------------------------------------------

def test_xauth_ok_then_pull(store, checker, logged):
    counted = []
    t = server(store, checker, count=counted.append)
    assert t.state == XAUTH and not t.xauth_passed
    [req] = ok(t.start())
    assert req.cfg_type == C.CFG_REQUEST and not is_response(req)
    assert [(a.type, a.value) for a in req.attributes] == [
        (C.XAUTH_TYPE, C.XAUTH_TYPE_GENERIC), (C.XAUTH_USER_NAME, b""), (C.XAUTH_USER_PASSWORD, b"")]
    assert req.identifier != 0

    [status] = ok(t.received(xauth_reply(b"alice", b"wonderland")))
    assert status.cfg_type == C.CFG_SET and status.identifier not in (0, req.identifier)
    assert status.attributes == (A(C.XAUTH_STATUS, C.XAUTH_STATUS_OK),)
    assert t.state == XAUTH and t.user == "alice"  # Quick Mode waits for the ack
    assert ok(t.received(XAUTH_ACK)) == []
    assert t.state == CONFIG and t.xauth_passed

    [reply] = ok(t.received(strongswan_request(0x4242)))
    assert reply.cfg_type == C.CFG_REPLY and reply.identifier == 0x4242 and is_response(reply)
    assert t.state == DONE and t.address == IPv4Address("10.8.0.2")
    assert values(reply, C.INTERNAL_IP4_ADDRESS) == [IPv4Address("10.8.0.2").packed]
    assert values(reply, C.INTERNAL_IP4_NETMASK) == [IPv4Address("255.255.255.248").packed]  # the pool's /29
    assert values(reply, C.INTERNAL_IP4_DNS) == [bytes([10, 8, 0, 1]), bytes([192, 0, 2, 53])]
    assert values(reply, C.INTERNAL_IP4_NBNS) == []
    assert values(reply, C.INTERNAL_IP4_SUBNET) == [bytes([10, 0, 0, 0, 255, 0, 0, 0]),
                                                    bytes([172, 16, 0, 0, 255, 240, 0, 0])]
    [unity] = values(reply, C.UNITY_SPLIT_INCLUDE)
    assert split_include_networks(unity) == [IPv4Network("10.0.0.0/8"), IPv4Network("172.16.0.0/12")]
    assert not values(reply, C.UNITY_LOCAL_LAN) and not values(reply, C.UNITY_BANNER)  # not ours: ignored
    assert store.holds("pool:ra", IPv4Address("10.8.0.2")) == "ike-sa-1"
    assert counted == ["xauth_ok", "modecfg_address"]
    text = " ".join(formatEvent(e) for e in logged)
    assert "alice" in text and "10.8.0.2" in text and "wonderland" not in text


def test_bad_password_is_retried_with_a_message(store, checker, logged):
    counted = []
    t = server(store, checker, count=counted.append)
    [first] = ok(t.start())
    [again] = ok(t.received(xauth_reply(b"alice", b"wrong")))
    assert again.cfg_type == C.CFG_REQUEST and again.identifier != first.identifier
    assert values(again, C.XAUTH_MESSAGE) and values(again, C.XAUTH_USER_PASSWORD) == [b""]
    assert t.state == XAUTH and t.xauth_failures == 1 and t.user is None
    [status] = ok(t.received(xauth_reply(b"alice", b"wonderland", again.identifier)))
    assert status.get(C.XAUTH_STATUS).value == C.XAUTH_STATUS_OK
    ok(t.received(XAUTH_ACK))
    assert t.state == CONFIG and t.user == "alice"
    assert counted == ["xauth_bad_password", "xauth_ok"]
    warnings = [formatEvent(e) for e in logged if "attempt" in formatEvent(e)]
    assert len(warnings) == 1 and "'alice'" in warnings[0] and "1/3" in warnings[0]
    assert "wrong" not in " ".join(formatEvent(e) for e in logged)


def test_fail_after_the_retries(store, checker, logged):
    counted = []
    t = server(store, checker, RemoteAccessPolicy(xauth=True, pool="ra", xauth_retries=1), count=counted.append)
    ok(t.start())
    [again] = ok(t.received(xauth_reply(b"alice", b"nope1")))
    assert again.cfg_type == C.CFG_REQUEST
    [status] = ok(t.received(xauth_reply(b"alice", b"nope2")))
    assert status.cfg_type == C.CFG_SET and status.attributes == (A(C.XAUTH_STATUS, C.XAUTH_STATUS_FAIL),)
    assert t.state == FAILED and not t.xauth_passed and t.xauth_failures == 2
    assert "XAUTH failed 2 times" in t.failure_reason and "nope" not in t.failure_reason
    assert ok(t.received(XAUTH_ACK)) == []  # the client's ack of FAIL is taken; the engine deletes the SA
    with pytest.raises(TransactionError):
        t.received(strongswan_request())
    assert t.address is None and store.pool_usage("ra")[0] == 0
    assert counted == ["xauth_bad_password", "xauth_bad_password", "xauth_failed"]
    assert "nope" not in " ".join(formatEvent(e) for e in logged)


def test_zero_retries_fail_at_once_and_unknown_user_is_a_bad_password(store, checker):
    t = server(store, checker, RemoteAccessPolicy(xauth=True, pool="ra", xauth_retries=0))
    ok(t.start())
    [status] = ok(t.received(xauth_reply(b"mallory", b"wonderland")))
    assert status.get(C.XAUTH_STATUS).value == C.XAUTH_STATUS_FAIL and t.state == FAILED
    assert "'mallory'" in t.failure_reason and t.user is None


def test_unknown_user_is_retried_like_a_bad_password(store, checker):
    t = server(store, checker)
    ok(t.start())
    [again] = ok(t.received(xauth_reply(b"mallory", b"x")))
    assert again.cfg_type == C.CFG_REQUEST and t.state == XAUTH
    [status] = ok(t.received(xauth_reply(b"bob", b"builder")))
    assert status.get(C.XAUTH_STATUS).value == C.XAUTH_STATUS_OK and t.user == "bob"


def test_nul_terminated_credentials_and_unusable_replies(store, checker):
    t = server(store, checker)
    ok(t.start())
    # strongSwan sends an empty reply when it has no secret: a failed attempt, not a crash
    [again] = ok(t.received(P(C.CFG_REPLY, 0, [])))
    assert again.cfg_type == C.CFG_REQUEST and t.xauth_failures == 1
    [again] = ok(t.received(P(C.CFG_REPLY, 0, [A(C.XAUTH_USER_NAME, 7), A(C.XAUTH_USER_PASSWORD, b"x")])))
    assert again.cfg_type == C.CFG_REQUEST and t.xauth_failures == 2
    # Android: C strings
    [status] = ok(t.received(xauth_reply(b"alice\0", b"wonderland\0")))
    assert status.get(C.XAUTH_STATUS).value == C.XAUTH_STATUS_OK and t.user == "alice"


def test_client_cancel(store, checker):
    t = server(store, checker)
    ok(t.start())
    [status] = ok(t.received(P(C.CFG_REPLY, 0, [A(C.XAUTH_STATUS, C.XAUTH_STATUS_FAIL)])))
    assert status.get(C.XAUTH_STATUS).value == C.XAUTH_STATUS_FAIL
    assert t.state == FAILED and "cancelled" in t.failure_reason and t.xauth_failures == 0


def test_asynchronous_check_and_what_may_not_interleave(store):
    pending: list[defer.Deferred] = []

    def check(user, password):
        pending.append(defer.Deferred())
        return pending[-1]

    t = TransactionServer.for_store(POLICY, store, "sa", check_password=check, peer_name="sa")
    with pytest.raises(TransactionError, match="before the transaction server started"):
        t.received(xauth_reply(b"alice", b"pw"))
    ok(t.start())
    with pytest.raises(TransactionError, match="start"):
        t.start()
    for early in (XAUTH_ACK, strongswan_request(), P(C.CFG_SET, 1, [A(C.XAUTH_STATUS, 1)]), P(9, 1, [])):
        with pytest.raises(TransactionError) as exc:
            t.received(early)
        assert exc.value.payload is early
        assert t.state == XAUTH
    d = t.received(xauth_reply(b"alice", b"pw"))
    assert not d.called and len(pending) == 1
    # a second reply while the check runs is queued, then found not to fit: answered with []
    dup = t.received(xauth_reply(b"alice", b"pw"))
    assert not dup.called and len(pending) == 1
    pending[0].callback(True)
    [status] = ok(d)
    assert status.get(C.XAUTH_STATUS).value == C.XAUTH_STATUS_OK
    assert ok(dup) == [] and len(pending) == 1 and t.state == XAUTH
    with pytest.raises(TransactionError, match="waiting for CFG_ACK"):
        t.received(xauth_reply(b"alice", b"pw"))


def test_request_right_behind_the_xauth_ack_waits_for_the_pushed_lease(store, checker):
    """Seen in the lab: strongSwan (pull) sends its CFG_REQUEST right after the XAUTH ack,
    while a durable store has not yet confirmed the lease for our push.  It must be served
    after the push, not dropped."""
    leases: list[defer.Deferred] = []

    def lease(prefer):
        leases.append(defer.Deferred())
        return leases[-1]

    t = TransactionServer(RemoteAccessPolicy(xauth=True, pool="ra", push=True), lease=lease,
                          check_password=lambda u, p: defer.succeed(True), peer_name="lab",
                          pool_network=IPv4Network("10.8.0.0/29"))
    ok(t.start())
    ok(t.received(xauth_reply(b"alice", b"pw")))
    sent: list[I.AttributePayload] = []
    t.received(XAUTH_ACK).addCallback(sent.extend)  # push: the lease is in flight
    t.received(strongswan_request(0x77)).addCallback(sent.extend)
    assert sent == [] and len(leases) == 1
    leases[0].callback(IPv4Address("10.8.0.3"))  # the store confirms
    assert [p.cfg_type for p in sent] == [C.CFG_SET] and len(leases) == 2  # now the request asks
    leases[1].callback(IPv4Address("10.8.0.3"))  # (a store answers the same owner at once)
    assert [p.cfg_type for p in sent] == [C.CFG_SET, C.CFG_REPLY]  # in arrival order
    assert sent[1].identifier == 0x77 and values(sent[1], C.INTERNAL_IP4_ADDRESS) == [bytes([10, 8, 0, 3])]
    # the pull client then answers our SET with a REPLY: our transaction is over
    assert ok(t.received(P(C.CFG_REPLY, sent[0].identifier, [A(C.INTERNAL_IP4_ADDRESS, b"")]))) == []
    assert t.state == DONE and t.address == IPv4Address("10.8.0.3")


def test_a_raising_checker_counts_as_a_bad_password(store):
    def check(user, password):
        raise RuntimeError("thread pool gone")

    t = TransactionServer.for_store(POLICY, store, "sa", check_password=check, peer_name="sa")
    ok(t.start())
    [again] = ok(t.received(xauth_reply(b"alice", b"pw")))
    assert again.cfg_type == C.CFG_REQUEST and t.xauth_failures == 1


def test_request_overtaking_the_xauth_ack_is_served(store, checker):
    t = server(store, checker)
    ok(t.start())
    ok(t.received(xauth_reply(b"alice", b"wonderland")))
    [reply] = ok(t.received(strongswan_request()))
    assert reply.cfg_type == C.CFG_REPLY and t.state == DONE and t.address is not None
    assert ok(t.received(XAUTH_ACK)) == []
    assert t.state == DONE


# -- mode-config -----------------------------------------------------------------------------

def test_pull_without_xauth_and_a_second_request_gets_the_same_address(store, checker):
    t = server(store, checker, RemoteAccessPolicy(pool="ra", netmask="255.255.255.0", nbns=("10.8.0.1",)))
    assert t.state == CONFIG and t.xauth_passed and t.user is None
    assert ok(t.start()) == []
    [reply] = ok(t.received(strongswan_request(7, unity=False)))
    assert values(reply, C.INTERNAL_IP4_NETMASK) == [bytes([255, 255, 255, 0])]  # configured beats the pool's
    assert values(reply, C.INTERNAL_IP4_NBNS) == [bytes([10, 8, 0, 1])]
    assert not values(reply, C.UNITY_SPLIT_INCLUDE)  # not asked for
    first = t.address
    [again] = ok(t.received(strongswan_request(8, unity=False)))
    assert again.identifier == 8 and values(again, C.INTERNAL_IP4_ADDRESS) == [first.packed]
    assert store.pool_usage("ra") == (1, 5)


def test_push_without_xauth(store, checker):
    t = server(store, checker, RemoteAccessPolicy(pool="ra", dns=("192.0.2.53",), split_include=("10.0.0.0/8",),
                                                  push=True), unity=True)
    [push] = ok(t.start())
    assert push.cfg_type == C.CFG_SET and not is_response(push) and push.identifier != 0
    assert values(push, C.INTERNAL_IP4_ADDRESS) == [t.address.packed] and t.state == CONFIG
    assert split_include_networks(values(push, C.UNITY_SPLIT_INCLUDE)[0]) == [IPv4Network("10.0.0.0/8")]
    # strongSwan's ack: identifier 0, the received types with empty values
    ack = P(C.CFG_ACK, 0, [A(C.INTERNAL_IP4_ADDRESS, b""), A(C.INTERNAL_IP4_DNS, b"")])
    assert ok(t.received(ack)) == []
    assert t.state == DONE
    with pytest.raises(TransactionError):
        t.received(ack)


def test_push_to_a_pull_client(store, checker):
    """strongSwan with pull = yes answers an unexpected SET with a REPLY, then asks itself."""
    t = server(store, checker, RemoteAccessPolicy(pool="ra", push=True))
    [push] = ok(t.start())
    assert ok(t.received(P(C.CFG_REPLY, push.identifier, [A(C.INTERNAL_IP4_ADDRESS, b"")]))) == []
    assert t.state == DONE
    [reply] = ok(t.received(strongswan_request(5)))
    assert values(reply, C.INTERNAL_IP4_ADDRESS) == [t.address.packed] and store.pool_usage("ra")[0] == 1
    with pytest.raises(TransactionError):
        t.received(P(C.CFG_REPLY, push.identifier, []))


def test_push_after_xauth_and_no_unity_without_the_vendor_id(store, checker):
    t = server(store, checker, RemoteAccessPolicy(xauth=True, pool="ra", split_include=("10.0.0.0/8",), push=True))
    ok(t.start())
    [status] = ok(t.received(xauth_reply(b"alice", b"wonderland")))
    [push] = ok(t.received(XAUTH_ACK))
    assert push.cfg_type == C.CFG_SET and t.state == CONFIG and t.address == IPv4Address("10.8.0.2")
    assert values(push, C.INTERNAL_IP4_SUBNET) and not values(push, C.UNITY_SPLIT_INCLUDE)
    ok(t.received(P(C.CFG_ACK, push.identifier, [])))
    assert t.state == DONE


def test_two_sas_get_distinct_addresses_and_release_them(store, checker):
    policy = RemoteAccessPolicy(pool="ra")
    a, b = server(store, checker, policy, "sa-a"), server(store, checker, policy, "sa-b")
    ok(a.start()), ok(b.start())
    ok(a.received(strongswan_request())), ok(b.received(strongswan_request()))
    assert a.address != b.address and {a.address, b.address} <= set(IPv4Network("10.8.0.0/29").hosts())
    ok(store.drop_owner("sa-a"))
    assert store.pool_usage("ra") == (1, 5)


def test_requested_address_is_honoured_when_free(store, checker):
    policy = RemoteAccessPolicy(pool="ra")
    a = server(store, checker, policy, "sa-a")
    ok(a.start())
    ok(a.received(strongswan_request(address=bytes([10, 8, 0, 5]))))
    assert a.address == IPv4Address("10.8.0.5")
    b = server(store, checker, policy, "sa-b")  # asks for the same: gets another
    ok(b.start())
    ok(b.received(strongswan_request(address=bytes([10, 8, 0, 5]))))
    assert b.address not in (None, IPv4Address("10.8.0.5"))
    c = server(store, checker, policy, "sa-c")  # 0.0.0.0 and outside the pool mean "any"
    ok(c.start())
    ok(c.received(strongswan_request(address=bytes(4))))
    d = server(store, checker, policy, "sa-d")
    ok(d.start())
    ok(d.received(strongswan_request(address=bytes([192, 0, 2, 9]))))
    assert d.address in IPv4Network("10.8.0.0/29") and len({a.address, b.address, c.address, d.address}) == 4


def test_pool_exhausted_is_a_clear_failure(store, checker, logged):
    policy = RemoteAccessPolicy(pool="ra", dns=("192.0.2.53",))
    for i in range(5):
        ok(store.lease_address("ra", f"other-{i}"))
    counted = []
    t = server(store, checker, policy, count=counted.append)
    ok(t.start())
    [reply] = ok(t.received(strongswan_request(3)))
    assert reply.cfg_type == C.CFG_REPLY and reply.identifier == 3
    assert not values(reply, C.INTERNAL_IP4_ADDRESS) and not values(reply, C.INTERNAL_IP4_NETMASK)
    assert t.state == FAILED and t.address is None and not t.xauth_passed
    assert "'ra'" in t.failure_reason and "no free address" in t.failure_reason
    assert counted == ["modecfg_no_address"]
    pushed = server(store, checker, RemoteAccessPolicy(pool="ra", push=True), "sa-push")
    assert ok(pushed.start()) == [] and pushed.state == FAILED
    with pytest.raises(Exhausted):
        ok(store.lease_address("ra", "yet-another"))


def test_no_pool_hands_out_no_address(store, checker):
    t = server(store, checker, RemoteAccessPolicy(dns=("192.0.2.53",), split_include=("10.0.0.0/8",)))
    ok(t.start())
    [reply] = ok(t.received(strongswan_request()))
    assert not values(reply, C.INTERNAL_IP4_ADDRESS) and values(reply, C.INTERNAL_IP4_DNS)
    assert t.state == DONE and t.address is None


def test_supported_attributes_and_application_version(store, checker):
    t = server(store, checker, RemoteAccessPolicy(pool="ra"))
    ok(t.start())
    [reply] = ok(t.received(P(C.CFG_REQUEST, 1, [A(C.SUPPORTED_ATTRIBUTES, b""), A(C.APPLICATION_VERSION, b"")])))
    [supported] = values(reply, C.SUPPORTED_ATTRIBUTES)
    types = {int.from_bytes(supported[i:i + 2], "big") for i in range(0, len(supported), 2)}
    assert {C.INTERNAL_IP4_ADDRESS, C.INTERNAL_IP4_DNS, C.UNITY_SPLIT_INCLUDE} <= types
    assert values(reply, C.APPLICATION_VERSION)[0].startswith(b"narsuite ")
    assert not values(reply, C.INTERNAL_IP4_ADDRESS)  # not asked for: no lease taken
    assert store.pool_usage("ra")[0] == 0


def test_lease_callable_contract_without_a_store():
    asked = []

    def lease(prefer):
        asked.append(prefer)
        return defer.succeed(IPv4Address("10.9.0.7"))

    t = TransactionServer(RemoteAccessPolicy(pool="p"), lease=lease, check_password=lambda u, p: defer.succeed(False),
                          peer_name="x", pool_network=IPv4Network("10.9.0.0/24"))
    ok(t.start())
    [reply] = ok(t.received(strongswan_request(address=bytes([10, 9, 0, 7]))))
    assert asked == [IPv4Address("10.9.0.7")] and t.address == IPv4Address("10.9.0.7")
    assert values(reply, C.INTERNAL_IP4_NETMASK) == [bytes([255, 255, 255, 0])]


def test_policy_is_validated():
    for bad in (dict(dns=("10.0.0.300",)), dict(split_include=("10.0.0.0/33",)), dict(netmask="255.0.255.0"),
                dict(xauth_retries=-1), dict(nbns=("::1",))):
        with pytest.raises(ValueError):
            RemoteAccessPolicy(**bad)
    assert RemoteAccessPolicy(netmask="/24").netmask == "255.255.255.0"
    with pytest.raises(ValueError, match="no address pool"):
        TransactionServer.for_store(RemoteAccessPolicy(pool="nope"), Store(MemoryBackend(), Clock()), "o",
                                    check_password=lambda u, p: defer.succeed(True), peer_name="x")


# -- wire: round trip, the drafts' layouts, tshark ---------------------------------------------

def every_payload(store, checker) -> list[I.AttributePayload]:
    out = []
    t = server(store, checker, RemoteAccessPolicy(xauth=True, pool="ra", dns=("192.0.2.53",), nbns=("192.0.2.54",),
                                                  split_include=("10.0.0.0/8",), xauth_retries=1, push=True),
               unity=True)
    out += ok(t.start())
    out += ok(t.received(xauth_reply(b"alice", b"bad")))  # retry request with a message
    out += ok(t.received(xauth_reply(b"alice", b"wonderland")))  # SET OK
    out += ok(t.received(XAUTH_ACK))  # pushed SET
    out += ok(t.received(P(C.CFG_REQUEST, 0xFFFF, [A(C.INTERNAL_IP4_ADDRESS, b""), A(C.UNITY_SPLIT_INCLUDE, b""),
                                                   A(C.SUPPORTED_ATTRIBUTES, b""), A(C.APPLICATION_VERSION, b"")])))
    f = server(store, checker, RemoteAccessPolicy(xauth=True, xauth_retries=0), "sa-f")
    ok(f.start())
    out += ok(f.received(xauth_reply(b"alice", b"bad")))  # SET FAIL
    return out


def test_every_payload_round_trips(store, checker):
    payloads = every_payload(store, checker)
    assert [p.cfg_type for p in payloads] == [C.CFG_REQUEST, C.CFG_REQUEST, C.CFG_SET, C.CFG_SET, C.CFG_REPLY,
                                              C.CFG_SET]
    for p in payloads:
        assert I.parse_payloads(C.PT_ATTRIBUTE, I.build_payloads([p])) == (p,)
    # the whole chain the engine sends: HASH then ATTR, in a transaction exchange
    msg = I.build_message(I.Header(b"i" * 8, b"r" * 8, C.EXCH_TRANSACTION, 0, 0x1234),
                          [I.Hash(b"h" * 20), payloads[0]])
    assert I.parse_message(msg).payloads[1] == payloads[0]


def test_encodings_follow_the_drafts():
    """Layouts from draft-ietf-ipsec-isakmp-mode-cfg-05 3.2/3.3 (Attribute payload: type,
    reserved, identifier; attributes as RFC 2408 data attributes, TV when the AF bit is set)
    and draft-beaulieu-ike-xauth-02 (XAUTH-TYPE and XAUTH-STATUS basic, the strings
    variable); Cisco's UNITY_SPLIT_INCLUDE as strongSwan's unity plugin writes it."""
    store = Store(MemoryBackend(), Clock())
    store.add_pool("ra", IPv4Network("10.8.0.0/24"))
    t = TransactionServer.for_store(RemoteAccessPolicy(xauth=True, pool="ra", dns=("192.0.2.53",),
                                                       split_include=("10.1.0.0/16",)),
                                    store, "o", check_password=lambda u, p: defer.succeed(True), peer_name="o")
    [req] = ok(t.start())
    body = I.build_payloads([req])[4:]
    assert body == (bytes([C.CFG_REQUEST, 0]) + req.identifier.to_bytes(2, "big")
                    + bytes.fromhex("c088 0000" "4089 0000" "408a 0000"))
    [status] = ok(t.received(xauth_reply(b"alice", b"pw")))
    assert I.build_payloads([status])[4:] == (bytes([C.CFG_SET, 0]) + status.identifier.to_bytes(2, "big")
                                              + bytes.fromhex("c08f 0001"))
    ok(t.received(XAUTH_ACK))
    [reply] = ok(t.received(strongswan_request(0xABCD)))
    assert I.build_payloads([reply])[4:] == bytes.fromhex(
        "02 00 abcd"
        "0001 0004 0a080001"            # INTERNAL_IP4_ADDRESS 10.8.0.1
        "0002 0004 ffffff00"            # INTERNAL_IP4_NETMASK of the /24 pool
        "0003 0004 c0000235"            # INTERNAL_IP4_DNS 192.0.2.53
        "000d 0008 0a010000 ffff0000"   # INTERNAL_IP4_SUBNET address + mask
        "7004 000e 0a010000 ffff0000 000000000000")  # UNITY_SPLIT_INCLUDE: + proto, sport, dport, pad


def test_tshark_reads_our_payloads(tmp_path, store, checker):
    if shutil.which("tshark") is None:
        pytest.skip("tshark missing")
    from scapy.layers.inet import IP, UDP
    from scapy.packet import Raw
    from scapy.utils import wrpcap

    payloads = every_payload(store, checker)
    messages = [I.build_message(I.Header(b"i" * 8, b"r" * 8, C.EXCH_TRANSACTION, 0, 100 + n), [p])
                for n, p in enumerate(payloads)]
    pcap = tmp_path / "cfg.pcap"
    wrpcap(str(pcap), [IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=4500, dport=500) / Raw(m) for m in messages])
    fields = ["isakmp.cfg.type", "isakmp.cfg.identifier", "isakmp.cfg.attr.type", "isakmp.cfg.attr.xauth.status",
              "isakmp.cfg.attr.xauth.message", "isakmp.cfg.attr.internal_ip4_address",
              "isakmp.cfg.attr.internal_ip4_netmask", "isakmp.cfg.attr.internal_ip4_dns",
              "isakmp.cfg.attr.internal_ip4_nbns", "isakmp.cfg.attr.internal_ip4_subnet_ip",
              "isakmp.cfg.attr.internal_ip4_subnet_netmask", "isakmp.cfg.attr.application_version",
              "_ws.malformed", "_ws.expert.severity"]
    cmd = ["tshark", "-r", str(pcap), "-T", "fields", "-E", "aggregator=|"] + sum((["-e", f] for f in fields), [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    rows = [dict(zip(fields, line.split("\t"))) for line in out.splitlines()]
    assert len(rows) == len(payloads)
    for row, p in zip(rows, payloads):
        assert row["isakmp.cfg.type"] == str(p.cfg_type) and row["isakmp.cfg.identifier"] == str(p.identifier)
        assert row["isakmp.cfg.attr.type"] == "|".join(str(a.type) for a in p.attributes)
        assert row["_ws.malformed"] == "" and row["_ws.expert.severity"] == "", row
    req, retry, set_ok, push, reply, set_fail = rows
    assert retry["isakmp.cfg.attr.xauth.message"].startswith("Authentication failed")
    assert set_ok["isakmp.cfg.attr.xauth.status"] == "1" and set_fail["isakmp.cfg.attr.xauth.status"] == "0"
    assert push["isakmp.cfg.attr.internal_ip4_address"] == "10.8.0.2"
    assert push["isakmp.cfg.attr.internal_ip4_netmask"] == "255.255.255.248"
    assert push["isakmp.cfg.attr.internal_ip4_dns"] == "192.0.2.53"
    assert push["isakmp.cfg.attr.internal_ip4_nbns"] == "192.0.2.54"
    assert (push["isakmp.cfg.attr.internal_ip4_subnet_ip"], push["isakmp.cfg.attr.internal_ip4_subnet_netmask"]) \
        == ("10.0.0.0", "255.0.0.0")
    assert reply["isakmp.cfg.attr.internal_ip4_address"] == "10.8.0.2"
    assert reply["isakmp.cfg.attr.application_version"].startswith("narsuite ")


def test_split_include_decoder_refuses_odd_sizes():
    with pytest.raises(ValueError):
        split_include_networks(bytes(13))
    assert split_include_networks(b"") == []
    assert ipaddress.IPv4Network("10.0.0.0/8") in split_include_networks(bytes([10, 0, 0, 0, 255, 0, 0, 0]) + bytes(6))
