"""The redis backend's write connection on the reactor thread, with Twisted fakes (no Redis).

What goes on the wire (one EVALSHA per batch, WAIT behind it with replicas_ack), and what the
node does when the connection breaks, stops answering or hears NOSCRIPT.  The same paths against
a real Redis: tests/test_store_redis.py.
"""

from __future__ import annotations

import json

import attrs
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from narsuite.store import Conflict, Index, KindSpec
from narsuite.store.backends import Write
from narsuite.store.redis import NotReplicated, RedisBackend, StoreUnavailable, _RespWriter


@attrs.frozen
class Rec:
    name: str
    spi: int


REC = KindSpec("t.rec", Rec, key=lambda r: r.name, indexes=(Index("spi", lambda r: r.spi),))


def backend(**kw):  # type: ignore[no-untyped-def]
    """A backend whose write connection is a StringTransport (as if connected and the script loaded)."""
    b = RedisBackend(lambda name: None, "n1", prefix="t:", **kw)
    b._reactor = clock = Clock()
    b._connected = True
    b._writer_done = None
    proto = _RespWriter(b)
    tr = StringTransport()
    proto.makeConnection(tr)
    b._wproto = proto
    b._evalsha_head = b"*7\r\n$7\r\nEVALSHA\r\n$3\r\nsha\r\n$1\r\n0\r\n$2\r\nt:\r\n$2\r\nn1\r\n$7\r\n1000000\r\n"
    return b, proto, tr, clock


def write(name: str, spi: int) -> Write:
    return Write(REC, name, Rec(name, spi), None, "owner-1", "insert")


def commands(data: bytes) -> list:
    import hiredis

    r = hiredis.Reader(encoding="utf-8")
    r.feed(data)
    out = []
    while (c := r.gets()) is not False:
        out.append(c)
    return out


def outcome(d):  # type: ignore[no-untyped-def]
    box: list = []
    d.addBoth(box.append)
    return box[0] if box else None


def test_a_reactor_turns_writes_go_as_one_evalsha_and_the_replies_fire_them() -> None:
    b, proto, tr, clock = backend()
    d1, d2 = b.submit([write("a", 1)]), b.submit([write("b", 2)])
    assert tr.value() == b""  # sent at the end of the reactor turn, together
    clock.advance(0)
    (cmd,) = commands(tr.value())
    assert cmd[:6] == ["EVALSHA", "sha", "0", "t:", "n1", "1000000"]
    batch = json.loads(cmd[6])
    assert [w[:3] for w in batch] == [["I", "t.rec", '"a"'], ["I", "t.rec", '"b"']]
    assert batch[0][8:] == ["t.rec:spi:1"]  # the unique index value the script takes
    tr.clear()
    d3 = b.submit([write("c", 3)])  # while the first batch is out: a second one is pipelined
    clock.advance(0)
    assert len(commands(tr.value())) == 1
    proto.dataReceived(b"*2\r\n*2\r\n$2\r\nOK\r\n$3\r\n5-1\r\n*3\r\n$1\r\nC\r\n$11\r\nt.rec:spi:2\r\n"
                       b"$9\r\nr:t.rec:x\r\n")
    assert outcome(d1) is None
    f = outcome(d2)
    assert isinstance(f, Failure) and isinstance(f.value, Conflict) and f.value.index == "spi"
    assert not d3.called and b.available
    proto.dataReceived(b"*1\r\n*2\r\n$2\r\nOK\r\n$3\r\n5-2\r\n")
    assert d3.called and outcome(d3) is None and not b._sent


def test_d_connection_lost_with_a_batch_out_fails_it_unavailable_and_asks_the_reader_to_check() -> None:
    b, proto, tr, clock = backend()
    d = b.submit([write("a", 1)])
    clock.advance(0)
    proto.connectionLost(Failure(ConnectionError("reset")))
    f = outcome(d)
    assert isinstance(f, Failure) and isinstance(f.value, StoreUnavailable)
    assert not b.available and b._recheck  # only the reader declares Redis back, after checking
    assert b._wproto is None


def test_d_redis_that_stops_answering_drops_the_connection_after_io_timeout() -> None:
    b, proto, tr, clock = backend(io_timeout=2.0)
    d = b.submit([write("a", 1)])
    clock.advance(0)
    clock.advance(1.9)
    assert not tr.disconnecting and not d.called
    clock.advance(0.2)
    assert tr.disconnecting  # aborted; the reactor then calls connectionLost:
    proto.connectionLost(Failure(ConnectionError("aborted")))
    assert isinstance(outcome(d).value, StoreUnavailable)


def test_replicas_ack_sends_wait_behind_the_batch_and_too_few_is_not_replicated() -> None:
    b, proto, tr, clock = backend(replicas_ack=1, ack_timeout=0.25)
    d1 = b.submit([write("a", 1)])
    clock.advance(0)
    evalsha, wait = commands(tr.value())
    assert evalsha[0] == "EVALSHA" and wait == ["WAIT", "1", "250"]
    proto.dataReceived(b"*1\r\n*2\r\n$2\r\nOK\r\n$3\r\n5-1\r\n")
    assert not d1.called  # the script ran; WAIT has not answered
    proto.dataReceived(b":0\r\n")
    f = outcome(d1)
    assert isinstance(f, Failure) and isinstance(f.value, NotReplicated) and f.value.applied
    d2 = b.submit([write("b", 2)])
    clock.advance(0)
    proto.dataReceived(b"*1\r\n*2\r\n$2\r\nOK\r\n$3\r\n5-2\r\n:1\r\n")
    assert outcome(d2) is None


def test_noscript_or_readonly_ends_the_connection_and_the_write_is_refused() -> None:
    for err in (b"-NOSCRIPT No matching script. Please use EVAL.\r\n",
                b"-READONLY You can't write against a read only replica.\r\n"):
        b, proto, tr, clock = backend()
        d = b.submit([write("a", 1)])
        clock.advance(0)
        proto.dataReceived(err)
        assert tr.disconnecting  # the next connection loads the script on the (new) primary
        assert isinstance(outcome(d).value, StoreUnavailable)


def test_a_script_error_fails_the_batch_and_keeps_the_connection() -> None:
    from narsuite.store.backends import StoreBackendError

    b, proto, tr, clock = backend()
    d = b.submit([write("a", 1)])
    clock.advance(0)
    proto.dataReceived(b"-ERR narsuite: unknown store op X\r\n")
    f = outcome(d)
    assert isinstance(f.value, StoreBackendError) and not isinstance(f.value, StoreUnavailable)
    assert not tr.disconnecting and b.available


def test_replies_on_a_connection_given_up_are_not_taken_for_the_new_ones() -> None:
    """After a NOSCRIPT the connection is aborted and its batches fail; bytes it still delivers
    must not be matched with batches sent on the next connection."""
    b, old, tr, clock = backend()
    d1 = b.submit([write("a", 1)])
    clock.advance(0)
    old.dataReceived(b"-NOSCRIPT No matching script.\r\n")
    old.connectionLost(Failure(ConnectionError("aborted")))
    assert isinstance(outcome(d1).value, StoreUnavailable)
    new = _RespWriter(b)
    new.makeConnection(StringTransport())
    b._wproto, b._connected = new, True
    d2 = b.submit([write("b", 2)])
    clock.advance(0)
    old.dataReceived(b"*1\r\n*3\r\n$1\r\nC\r\n$11\r\nt.rec:spi:2\r\n$9\r\nr:t.rec:x\r\n")  # stale
    assert not d2.called
    new.dataReceived(b"*1\r\n*2\r\n$2\r\nOK\r\n$3\r\n5-3\r\n")
    assert d2.called and outcome(d2) is None


def test_a_burst_beyond_max_batch_goes_in_batches_in_order() -> None:
    b, proto, tr, clock = backend(max_batch=3, pipeline=2)
    ds = [b.submit([write(f"k{i}", 100 + i)]) for i in range(7)]
    clock.advance(0)
    cmds = commands(tr.value())
    assert [[w[2] for w in json.loads(c[6])] for c in cmds] == [['"k0"', '"k1"', '"k2"'], ['"k3"', '"k4"', '"k5"']]
    tr.clear()
    proto.dataReceived(b"*3\r\n" + b"*2\r\n$2\r\nOK\r\n$3\r\n5-1\r\n" * 3)
    (cmd,) = commands(tr.value())  # the rest goes once a place on the connection is free
    assert [w[2] for w in json.loads(cmd[6])] == ['"k6"']
    assert [d.called for d in ds] == [True] * 3 + [False] * 4
