"""The shared store on Redis: real redis-server processes, real node processes (tests/store_node.py).

Proof cases of issue 13: (a) uniqueness under a race, (b) propagation and expiry across nodes,
(f) a restarted node resyncs; more below.  Each test starts and kills its own Redis on loopback.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import time

import pytest

from narsuite.lab.pytest_plugin import lab_required
from narsuite.lab.redis import RedisServer, redis_unavailable_reason
from tests.redis_nodes import NodeProc

reason = redis_unavailable_reason()
if reason is not None:
    if lab_required():
        raise RuntimeError(f"NARSUITE_REQUIRE_LAB=1 but {reason}")
    pytest.skip(reason, allow_module_level=True)

try:
    import redis
except ImportError:
    if lab_required():
        raise
    pytest.skip("redis-py is not installed", allow_module_level=True)


def store_toml(url: str, extra: str = "") -> str:
    return (f'[store]\nbackend = "redis"\n[store.pools.p]\nnetwork = "10.77.0.0/22"\n'
            f'[store.redis]\nurl = "{url}"\nprefix = "t:"\n{extra}\n')


@pytest.fixture
def server():
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def nodes(server):
    made: list[NodeProc] = []

    def make(name: str, extra: str = "", url: str | None = None, **kw) -> NodeProc:  # type: ignore[no-untyped-def]
        n = NodeProc(name, store_toml(url or f"redis://{server.address}", extra), **kw)
        made.append(n)
        return n.start()

    yield make
    for n in made:
        n.close()


def kill_clients(r, node: str) -> int:  # type: ignore[no-untyped-def]
    """CLIENT KILL every connection of one node (they are named narsuite:<node>:<thread>)."""
    n = 0
    for c in r.client_list():
        if c.get("name", "").startswith(f"narsuite:{node}:"):
            r.client_kill_filter(_id=c["id"])
            n += 1
    return n


def test_a_uniqueness_under_a_race_10000_allocations_two_nodes(server, nodes) -> None:
    """(a) Two nodes allocate concurrently from the same 10,000 numbers and the same /22 pool until
    both are exhausted: every value is held exactly once, and the races were real (lost ones)."""
    a, b = nodes("a"), nodes("b")
    ia = a.send("race", ns="race", low=1, high=10_000, concurrency=32)
    ib = b.send("race", ns="race", low=1, high=10_000, concurrency=32)
    ra, rb = a.reply(ia, 180), b.reply(ib, 180)
    assert ra["ok"] and rb["ok"], (ra, rb)
    ra, rb = ra["result"], rb["result"]
    assert not ra["failed"] and not rb["failed"], (ra["failed"], rb["failed"])
    both = ra["values"] + rb["values"]
    dup = [v for v, n in collections.Counter(both).items() if n > 1]
    assert dup == []
    assert len(both) == 10_000 and set(both) == set(range(1, 10_001))
    assert ra["values"] and rb["values"]  # both nodes really allocated
    assert ra["lost"] + rb["lost"] > 0, "no race was lost: the test did not race"
    r = redis.Redis(host=server.host, port=server.port)
    assert sum(1 for _ in r.scan_iter(match='t:r:store.lease:*"race"*', count=1000)) == 10_000
    # the pool: 1022 addresses, two nodes, distinct owners
    ia = a.send("race", ns="", low=0, high=0, concurrency=16, pool="p")
    ib = b.send("race", ns="", low=0, high=0, concurrency=16, pool="p")
    pa, pb = a.reply(ia, 120)["result"], b.reply(ib, 120)["result"]
    addrs = pa["values"] + pb["values"]
    assert len(addrs) == len(set(addrs)) == 1022, (len(addrs), len(set(addrs)), pa["failed"], pb["failed"])
    # both views converge on the same 11,022 leases
    a.until(lambda: len(a.call("view", kind="lease")) == 11_022, 10, "a's view")
    b.until(lambda: len(b.call("view", kind="lease")) == 11_022, 10, "b's view")
    assert a.call("view", kind="lease") == b.call("view", kind="lease")
    print(f"\nrace: a won {len(ra['values'])} lost {ra['lost']}, b won {len(rb['values'])} lost {rb['lost']}; "
          f"{10_000 / max(ra['seconds'], rb['seconds']):.0f} allocations/s together")


def test_a_unique_index_conflict_across_nodes_rolls_back(nodes) -> None:
    """A unique index value held on another node is the store's Conflict, and the loser's view
    rolls back (it never shows its own record)."""
    a, b = nodes("a"), nodes("b")
    a.call("insert", name="x", spi=4242)
    r = b.try_call("insert", name="y", spi=4242)
    # b may not have heard of x yet (then Redis refuses) or may have (then its view refuses):
    assert not r["ok"] and r["error"].startswith("Conflict"), r
    assert b.call("get", name="y") is None
    b.until(lambda: b.call("get", name="x"), 2, "x on b")
    a.call("delete", name="x")
    b.until(lambda: b.call("get", name="x") is None, 2, "x gone on b")
    b.call("insert", name="y", spi=4242)


def test_b_propagation_under_100ms_and_expiry_on_every_node(server, nodes) -> None:
    """(b) A write on one node is in the other's view within 100 ms (p99 of 300); a lifetime
    lapses on both nodes and in Redis, after which the other node can take the value;
    a touch on one node moves the expiry on the other."""
    a, b = nodes("a"), nodes("b")
    b.call("watch", kind="t.rec")
    lat = []
    for i in range(300):
        r = a.call("insert", name=f"p{i}", spi=10_000 + i)
        ev = b.wait_event(lambda e, k=f"p{i}": e.get("key") == k and e.get("op") == "put", 2, f"p{i} on b")
        lat.append((ev["t"] - r["t0"]) * 1000)
    lat.sort()
    p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99)]
    print(f"\npropagation a->b: p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {lat[-1]:.2f} ms")
    assert p99 < 100, lat[-10:]
    # expiry
    a.call("insert", name="short", spi=777, ttl=1.0)
    b.until(lambda: b.call("get", name="short"), 1, "short on b")
    ev = b.wait_event(lambda e: e.get("key") == "short" and e.get("op") == "delete", 3, "expiry on b")
    assert ev["reason"] == "expired"
    # a's own expiry runs on a's clock: it need not have fired by the time b reports it
    a.until(lambda: a.call("get", name="short") is None, 2, "expiry on a")
    r = redis.Redis(host=server.host, port=server.port)
    assert not r.exists('t:r:t.rec:"short"') and not r.exists("t:u:t.rec:spi:777")
    b.call("insert", name="short2", spi=777)  # the value is free everywhere
    # touch on a moves the expiry on b (within the store's one-second touch batch)
    a.call("insert", name="t", spi=778, ttl=2.0)
    b.until(lambda: b.call("get", name="t"), 1, "t on b")
    first = b.call("get", name="t")["expires"]
    assert a.call("touch", name="t", ttl=30.0)
    b.until(lambda: b.call("get", name="t")["expires"] > first + 20, 3, "the touched expiry on b")
    time.sleep(1.5)
    assert b.call("get", name="t") is not None and r.exists('t:r:t.rec:"t"')


def test_f_restarted_node_resyncs_and_reconnect_loses_nothing(server, nodes) -> None:
    """(f) A node killed with -9 and restarted loads the shared view (changes made while it was
    down included); a node whose connections are killed resumes from its stream position with
    no change lost and none applied twice; a node that missed trimmed changes reloads them."""
    a, b = nodes("a"), nodes("b")
    for i in range(50):
        a.call("insert", name=f"k{i}", spi=20_000 + i)
    b.until(lambda: len(b.call("view")) == 50, 3, "b has 50")
    b.kill()
    for i in range(50, 80):
        a.call("insert", name=f"k{i}", spi=20_000 + i)
    for i in range(0, 10):
        a.call("delete", name=f"k{i}")
    a.call("put", name="k20", spi=20_020, note="changed")
    b.start()
    assert b.call("view") == a.call("view")
    assert len(b.call("view")) == 70
    # reconnect: kill b's connections mid-stream; every change arrives exactly once
    b.call("watch", kind="t.rec")
    r = redis.Redis(host=server.host, port=server.port)
    for i in range(200):
        a.call("put", name=f"m{i}", spi=30_000 + i)
        if i in (50, 120, 170):
            kill_clients(r, "b")
    a.until(lambda: len(a.call("view")) == 270, 5, "a has 270")
    b.until(lambda: b.call("view") == a.call("view"), 10, "b equal to a")
    seen = collections.Counter(e["key"] for e in b.events if e.get("event") == "change" and e["key"].startswith("m"))
    assert set(seen) == {f"m{i}" for i in range(200)} and set(seen.values()) == {1}, seen.most_common(3)
    # a gap: b stopped, the stream trimmed to nothing, b's connections gone: a full reload
    b.kill(signal.SIGSTOP)
    for i in range(40):
        a.call("delete", name=f"m{i}")
    a.call("put", name="gap", spi=31_000)
    r.xtrim("t:log", maxlen=0)
    kill_clients(r, "b")
    b.kill(signal.SIGCONT)
    b.until(lambda: b.call("view") == a.call("view"), 10, "b reloaded after the gap")
    assert b.call("stats")["backend"]["resyncs"] >= 1


def test_dead_node_is_reaped_durable_records_stay(server, nodes) -> None:
    """A node killed with -9 stops heartbeating; the survivor reaps what its volatile owners
    (connections, SAs) held, in its view and in Redis, and keeps the durable records."""
    a, b = nodes("a"), nodes("b")
    a.call("insert", name="conn1", spi=501, owner="eph:c1")
    a.call("insert", name="conn2", spi=502, owner="eph:c2")
    a.call("claim", ns="spi", value=0xABCDEF, owner="eph:c1")
    a.call("insert", name="user-lease", spi=503, owner="lease:user:alice")
    b.call("insert", name="b-conn", spi=504, owner="eph:b1")
    b.until(lambda: len(b.call("view")) == 4, 2, "b sees a's records")
    a.kill()
    t0 = time.monotonic()
    b.until(lambda: b.call("view") == ["b-conn|504|", "user-lease|503|"], 5, "reaped on b")
    print(f"\nreaped {time.monotonic() - t0:.2f}s after kill -9 (heartbeat_timeout 0.6 s)")
    assert "spi|11259375|eph:c1" not in b.call("view", kind="lease")
    r = redis.Redis(host=server.host, port=server.port)
    assert not r.exists('t:r:t.rec:"conn1"') and not r.exists("t:u:t.rec:spi:502")
    assert r.exists('t:r:t.rec:"user-lease"') and r.exists('t:r:t.rec:"b-conn"')
    assert b.call("stats")["backend"]["reaped"] == 3
    b.call("insert", name="again", spi=501)  # the reaped values are free


def test_d_redis_down_reads_go_on_writes_refused_and_counted_then_recovery(nodes) -> None:
    """(d) Redis killed: the view still answers (the packet path's reads), new writes fail at
    once with StoreUnavailable and are counted; Redis back: the node takes writes again by itself."""
    with RedisServer(appendonly=True) as srv:
        a = nodes("a", url=f"redis://{srv.address}")
        a.call("insert", name="before", spi=601)
        srv.kill()
        t0 = time.monotonic()
        r = a.try_call("insert", name="during", spi=602)
        while r["ok"] or "StoreUnavailable" not in r["error"]:
            assert time.monotonic() - t0 < 5, r
            r = a.try_call("insert", name="during", spi=602)
        t1 = time.monotonic()
        r = a.try_call("insert", name="during2", spi=603)
        assert not r["ok"] and "StoreUnavailable" in r["error"]
        assert time.monotonic() - t1 < 0.5  # refused at once, not after a timeout
        assert a.call("get", name="before") is not None and a.call("get", name="during") is None
        stats = a.call("stats")["backend"]
        assert stats["available"] == 0 and stats["refused_unavailable"] >= 1
        srv.start()
        a.until(lambda: a.try_call("insert", name="after", spi=604)["ok"], 10, "writes resume")
        assert a.call("stats")["backend"]["available"] == 1
        assert a.call("view") == ["after|604|", "before|601|"]


def test_d_redis_that_stops_answering_refuses_the_write_within_the_timeout_then_recovers(nodes) -> None:
    """(d) Redis hangs (SIGSTOP: the connections stay open, nothing answers): a write fails with
    StoreUnavailable within connect_timeout + 1 s instead of waiting for ever, later writes are
    refused at once, and when Redis answers again the node takes writes by itself."""
    with RedisServer() as srv:
        a = nodes("a", url=f"redis://{srv.address}")
        a.call("insert", name="before", spi=621)
        assert srv.pid
        os.kill(srv.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            r = a.try_call("insert", name="hung", spi=622, timeout=30)
            took = time.monotonic() - t0
            assert not r["ok"] and "StoreUnavailable" in r["error"], r
            assert took < 4.0, took  # connect_timeout (1 s) + 1 s, and some slack for a loaded machine
            r = a.try_call("insert", name="during", spi=623)
            assert not r["ok"] and "StoreUnavailable" in r["error"], r
        finally:
            os.kill(srv.pid, signal.SIGCONT)
        a.until(lambda: a.try_call("insert", name="after", spi=624)["ok"], 10, "writes resume")
        assert a.call("stats")["backend"]["available"] == 1
        # ("hung" is in doubt: Redis may have run it after it woke, as with any broken connection)
        assert {"after|624|", "before|621|"} <= set(a.call("view"))
        assert "during|623|" not in a.call("view")


def test_d_writer_connection_lost_alone_the_node_recovers_by_itself(server, nodes) -> None:
    """(d) Only the writer's connection breaks (the reader's is fine, as when Redis came back
    before a write went out on an old socket): the node takes writes again by itself.
    (Regression: the reader alone declares Redis reachable, and it only did so after an error
    of its own: the node refused every write for good.)"""
    a = nodes("a")
    a.call("insert", name="before", spi=611)
    r = redis.Redis(host=server.host, port=server.port, decode_responses=True)
    for c in r.client_list():
        if c.get("name", "") == "narsuite:a:writer":
            r.client_kill_filter(_id=c["id"])
    res = a.try_call("insert", name="on-a-dead-socket", spi=612)
    # (the reactor's write connection hears the close at once and the write goes on a new one;
    # had the write been on its way, it would be refused as in doubt)
    assert res["ok"] or "StoreUnavailable" in res["error"], res
    a.until(lambda: a.try_call("insert", name="after", spi=613)["ok"], 5, "writes resume")
    assert a.call("stats")["backend"]["available"] == 1
    assert a.call("view") == ["after|613|", "before|611|"] + (["on-a-dead-socket|612|"] if res["ok"] else [])


def test_c_sentinel_failover_loses_no_acknowledged_write(tmp_path) -> None:
    """(c) Primary + replica + three Sentinels; two nodes with replicas_ack = 1 follow the
    primary through Sentinel.  The primary is killed -9 mid-load: after the failover every
    acknowledged write is in the new primary and in both views, and writes resume."""
    from narsuite.lab.redis import RedisSentinel

    primary = RedisServer().start()
    replica = RedisServer(replicaof=primary.address).start()
    sentinels = [RedisSentinel(primary.address, quorum=2, down_after_ms=800, failover_timeout_ms=3000).start()
                 for _ in range(3)]
    made: list[NodeProc] = []
    try:
        rp = redis.Redis(host=primary.host, port=primary.port)
        deadline = time.monotonic() + 10
        while rp.info("replication")["connected_slaves"] < 1:
            assert time.monotonic() < deadline, "replica did not connect"
            time.sleep(0.05)
        toml = ('[store]\nbackend = "redis"\n[store.redis]\nsentinels = [' +
                ", ".join(f'"{s.address}"' for s in sentinels) +
                ']\nservice = "narsuite"\nprefix = "t:"\nreplicas_ack = 1\nack_timeout = 0.5\n')
        a, b = NodeProc("a", toml), NodeProc("b", toml)
        made += [a, b]
        a.start()
        b.start()
        ia = a.send("load", n=60_000, prefix="a", concurrency=32, deadline=40)
        ib = b.send("load", n=60_000, prefix="b", concurrency=32, deadline=40)
        time.sleep(0.7)
        primary.kill()
        t_kill = time.monotonic()
        s0 = redis.Redis(host=sentinels[0].host, port=sentinels[0].port, decode_responses=True)
        while s0.sentinel_get_master_addr_by_name("narsuite")[1] != replica.port:
            assert time.monotonic() - t_kill < 20, "no failover"
            time.sleep(0.05)
        failover = time.monotonic() - t_kill
        # Every Sentinel must know the new primary before the old one comes back: one that has
        # not heard yet still takes the old address for the primary and, seeing it up again,
        # turns the new primary back into its replica (an empty one: everything lost).  An
        # operator restarting a dead primary waits for the same thing.
        for s in sentinels[1:]:
            sc = redis.Redis(host=s.host, port=s.port, decode_responses=True)
            while sc.sentinel_get_master_addr_by_name("narsuite")[1] != replica.port:
                assert time.monotonic() - t_kill < 20, "a Sentinel did not learn the new primary"
                time.sleep(0.05)
        # The failover under test is done: a slower down-after from here on, so that a loaded
        # machine (CI on two cores) cannot make the Sentinels take the new primary for dead and
        # fail over a second time -- to the old primary restarted empty below, the new primary
        # then resyncing from it: every write before that lost, by Sentinel, not by us.
        for s in sentinels:
            redis.Redis(host=s.host, port=s.port).execute_command(
                "SENTINEL", "SET", "narsuite", "down-after-milliseconds", "10000")
        # the old primary comes back empty; Sentinel makes it a replica of the new one
        primary = RedisServer(port=primary.port).start()
        ra, rb = a.reply(ia, 90), b.reply(ib, 90)
        assert ra["ok"] and rb["ok"], (ra, rb)
        acked = ra["result"]["acked"] + rb["result"]["acked"]
        state = s0.execute_command("SENTINEL", "MASTER", "narsuite")
        state = dict(zip(state[::2], state[1::2])) if isinstance(state, list) else state
        assert int(state["config-epoch"]) == 1, f"more than the one failover under test: {state}"
        new = redis.Redis(host=replica.host, port=replica.port, decode_responses=True)
        missing = []
        for i in range(0, len(acked), 1000):
            p = new.pipeline(transaction=False)
            for n in acked[i:i + 1000]:
                p.exists(f't:r:t.rec:"{n}"')
            missing += [n for n, e in zip(acked[i:i + 1000], p.execute()) if not e]
        print(f"\nfailover: {failover:.2f}s to promote; {len(acked)} acknowledged, {len(missing)} missing; "
              f"failures a {ra['result']['failed']} b {rb['result']['failed']}")
        assert missing == []
        assert len(acked) > 1000
        assert ra["result"]["failed"].get("unavailable", 0) + ra["result"]["failed"].get("NotReplicated", 0) > 0
        # both views hold every acknowledged record
        for node in (a, b):
            node.until(lambda node=node: set(acked) <= {v.split("|")[0] for v in node.call("view")}, 10,
                       "acknowledged records in the view")
        a.call("insert", name="after-failover", spi=0)
    finally:
        for n in made:
            n.close()
        for s in sentinels:
            s.close()
        replica.close()
        primary.close()


def test_narctl_cluster_shows_nodes_leader_and_store_health(server, tmp_path) -> None:
    """Two daemons on one Redis: `narctl cluster` on either lists both (roles, leader, store
    reachable); a node killed with -9 leaves the list after its heartbeat lapses."""
    import json
    import subprocess
    import sys

    from tests.test_daemon import HERE, _wait_socket

    procs = []
    socks = {}
    try:
        for n in ("n1", "n2"):
            d = tmp_path / n
            d.mkdir()
            f = d / "narsuite.toml"
            f.write_text(f'[daemon]\nstate_dir = "{d}/state"\nruntime_dir = "{d}/run"\n[metrics]\nenabled = false\n'
                         f'[store]\nbackend = "redis"\n[store.redis]\nurl = "redis://{server.address}"\n'
                         f'[cluster]\nnode_id = "{n}"\nheartbeat_interval = 0.2\nheartbeat_timeout = 0.6\n')
            p = subprocess.Popen([sys.executable, str(HERE / "run_twistd_demo.py"), "--config", str(f),
                                  "--role", "demo"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=d)
            procs.append(p)
            socks[n] = d / "run" / "control.sock"
            _wait_socket(socks[n], p)

        def cluster(n: str) -> dict:
            out = subprocess.run(["narctl", "--socket", str(socks[n]), "--json", "cluster"],
                                 capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        deadline = time.monotonic() + 5
        while len(cluster("n1")["rows"]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        t = cluster("n1")
        assert "reachable" in t["title"]
        nodes = {r["node"].split()[0]: r for r in t["rows"]}
        assert set(nodes) == {"n1", "n2"} and nodes["n2"]["roles"] == "demo"
        assert [r["leader"] for r in t["rows"]].count("yes") == 1
        procs[1].kill()
        procs[1].wait(10)
        deadline = time.monotonic() + 5
        while {r["node"].split()[0] for r in cluster("n1")["rows"]} != {"n1"}:
            assert time.monotonic() < deadline, cluster("n1")
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def test_acl_user_password_file_and_tls_and_the_password_is_never_logged(tmp_path) -> None:
    """A Redis that speaks only TLS (client certificates required) and knows only an ACL user:
    the daemon connects with username + password_file + CA/cert/key; with a wrong password it stops
    at start-up naming [store.redis] without printing the password; the right one never appears
    in its log or in `narctl cluster`."""
    import subprocess
    import sys

    from narsuite.lab import pki
    from tests.test_daemon import HERE, _wait_socket

    ca_key = pki.new_key()
    ca = pki.make_ca(pki.name("redis lab CA"), ca_key)
    files = {}
    for who, ids in (("server", ["127.0.0.1"]), ("client", ["gw1.example"])):
        k = pki.new_key()
        cert = pki.issue(pki.name(who), k, ca, ca_key, ids=ids)
        files[who] = (str(pki.write_cert(tmp_path / f"{who}.pem", cert)),
                      str(pki.write_key(tmp_path / f"{who}.key", k)))
    ca_file = str(pki.write_cert(tmp_path / "ca.pem", ca))
    os.chmod(files["client"][1], 0o600)
    secret = "pw-" + os.urandom(8).hex()
    with RedisServer(acl_user=("narsuite", secret), tls=(files["server"][0], files["server"][1], ca_file)) as srv:
        pwfile = tmp_path / "redis.pass"

        def daemon(password: str):  # type: ignore[no-untyped-def]
            pwfile.write_text(password + "\n")
            pwfile.chmod(0o600)
            d = tmp_path / "node"
            d.mkdir(exist_ok=True)
            f = d / "narsuite.toml"
            f.write_text(f'[daemon]\nstate_dir = "{d}/state"\nruntime_dir = "{d}/run"\n[metrics]\nenabled = false\n'
                         f'[log]\njson_file = "{d}/log.jsonl"\n'
                         f'[store]\nbackend = "redis"\n[store.redis]\nurl = "rediss://127.0.0.1:{srv.port}"\n'
                         f'username = "narsuite"\npassword_file = "{pwfile}"\ntls_ca_file = "{ca_file}"\n'
                         f'tls_cert_file = "{files["client"][0]}"\ntls_key_file = "{files["client"][1]}"\n'
                         f'[cluster]\nnode_id = "gw1"\n')
            return d, subprocess.Popen([sys.executable, str(HERE / "run_twistd_demo.py"), "--config", str(f),
                                        "--role", "demo"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, cwd=d)

        wrong = "wrong-" + os.urandom(8).hex()
        d, p = daemon(wrong)
        out, _ = p.communicate(timeout=60)
        assert p.returncode != 0
        assert "store.redis: cannot load the shared store from redis rediss://127.0.0.1" in out, out
        assert "user narsuite" in out and wrong not in out and secret not in out
        d, p = daemon(secret)
        try:
            _wait_socket(d / "run" / "control.sock", p)
            deadline = time.monotonic() + 10
            while True:  # the first heartbeat fills the table
                out = subprocess.run(["narctl", "--socket", str(d / "run" / "control.sock"), "--json", "cluster"],
                                     capture_output=True, text=True, timeout=30)
                t = json.loads(out.stdout)
                if t["rows"] or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert "reachable" in t["title"] and "TLS" in t["title"]
            assert [r["node"] for r in t["rows"]] == ["gw1 (this node)"]
            assert secret not in out.stdout
            assert "narsuite:gw1:writer" in srv.cli("client", "list")  # connected as the ACL user over TLS
        finally:
            p.terminate()
            out, _ = p.communicate(timeout=30)
        logs = out + (d / "log.jsonl").read_text()
        assert "store: node gw1 shares redis rediss://127.0.0.1" in logs and secret not in logs


def test_a_server_dies_with_its_owner_killed_without_teardown(tmp_path) -> None:
    """A test run killed by ``kill -9`` (or a timeout) runs no teardown: the Redis server it
    started on the host's loopback must not outlive it (the kernel's parent-death signal)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys, time
        from narsuite.lab.redis import RedisServer
        srv = RedisServer().start()
        print(srv.proc.pid, flush=True)
        time.sleep(60)
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        pid = int(owner.stdout.readline())
        os.kill(pid, 0)  # the server runs
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        # the orphan is reparented; a zombie would still answer kill(0): reap check by /proc
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"redis-server {pid} outlived its owner, killed with SIGKILL")
