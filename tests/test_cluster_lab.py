"""Gateway failover, levels 1 and 2 (issue 13, case e): two narsuite nodes (--role=esp,ike) share one
store on a real redis-server; a strongSwan client (IKEv1, XAUTH + mode-config) behind an nftables
NAT talks to the public address of the active node.  The active is killed with -9 and keepalived
(VRRPv3, tracking the daemon) moves the addresses to the standby; the client reconnects to the standby
and gets the same pool address;
nothing the dead node's SAs held stays allocated.

::

    R1, R3 192.168.1.x -- NAT1 -- pub -+- G1 wan0 203.0.113.2 (+ 198.51.100.1 while active) -+
                                       +- G2 wan0 203.0.113.3 (+ 198.51.100.1 after failover)--+- int 10.1.0.0/24
                                                                  H 10.1.0.10, DB (Redis) 10.1.0.20 -+
    G1 10.1.0.2, G2 10.1.0.3 on int; 10.1.0.1 (H's default route) moves with the public address.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import types
from collections.abc import Iterator
from pathlib import Path

import bcrypt
from labtraffic import ping

from narsuite.lab.daemon import NarsuiteDaemon
from narsuite.lab.redis import RedisServer
from narsuite.lab.strongswan import Charon, ikev1_client_conf, ikev2_client_conf
from narsuite.store.sealed import ClusterKey

PSK = "lab-psk-0123456789"
VIP, VIP_INT = "198.51.100.1", "10.1.0.1"


def node_config(tmp: Path, node: str, redis_url: str, key_file: Path, extra: str = "") -> Path:
    d = tmp / node
    d.mkdir()
    cfg = d / "narsuite.toml"
    pw = bcrypt.hashpw(b"alice-pw", bcrypt.gensalt(4)).decode()
    pw_bob = bcrypt.hashpw(b"bob-pw", bcrypt.gensalt(4)).decode()
    cfg.write_text(textwrap.dedent(f"""
        [daemon]
        state_dir = "state"
        runtime_dir = "run"
        [metrics]
        enabled = false
        [cluster]
        node_id = "{node}"
        heartbeat_interval = 0.3
        heartbeat_timeout = 1.0
        key_file = "{key_file}"
        [store]
        backend = "redis"
        [store.redis]
        url = "{redis_url}"
        prefix = "c:"
        [store.pools.ra]
        network = "10.8.0.0/24"
        exclude = ["10.8.0.1"]
        [esp]
        [ike]
        [ike.users]
        alice = "{pw}"
        bob = "{pw_bob}"
        [[ike.peers]]
        name = "rw"
        psk = "{PSK}"
        local_id = "gw.example"
        local_ts = ["10.1.0.0/24"]
        xauth = true
        pool = "ra"
        """) + textwrap.dedent(extra))
    return cfg


def records(db: RedisServer) -> list[tuple[str, str, str]]:
    """(record key, owner, node) of every record in the shared store."""
    out = []
    for key in db.cli("--scan", "--pattern", "c:r:*").split():
        owner, node = db.cli("hmget", key, "w", "n").splitlines()[:2]
        out.append((key, owner, node))
    return out


def wait(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Keepalived:
    """keepalived (VRRPv3, Debian's package) in a lab host: the public and the internal address
    follow a live narsuite daemon (its check: the daemon's PID exists)."""

    def __init__(self, host, d: Path, priority: int, daemon: NarsuiteDaemon,  # type: ignore[no-untyped-def]
                 notify_master: str = "") -> None:
        self.host, self.dir, self.priority, self.daemon = host, d, priority, daemon
        #: run when this node becomes master (level 2: ``narctl cluster adopt``)
        self.notify_master = notify_master
        self.proc = None

    def start(self) -> Keepalived:
        self.dir.mkdir()
        assert self.daemon.proc is not None
        conf = self.dir / "keepalived.conf"
        conf.write_text(textwrap.dedent(f"""
            global_defs {{
              script_user root
              enable_script_security
              vrrp_garp_master_delay 0
              vrrp_garp_master_repeat 2
            }}
            vrrp_script narsuite {{
              script "/bin/kill -0 {self.daemon.proc.pid}"
              interval 1
              fall 1
              rise 1
            }}
            vrrp_instance gw {{
              version 3
              state BACKUP
              nopreempt
              interface wan0
              virtual_router_id 51
              priority {self.priority}
              advert_int 0.2
              virtual_ipaddress {{
                {VIP}/24 dev wan0
                {VIP_INT}/24 dev lan0
              }}
              track_script {{
                narsuite
              }}
              {f'notify_master "{self.notify_master}"' if self.notify_master else ""}
            }}
            """))
        log = open(self.dir / "log", "w")
        self.proc = self.host.popen(["keepalived", "-n", "-l", "-P", "-f", str(conf), "-p", str(self.dir / "k.pid"),
                                     "-r", str(self.dir / "vrrp.pid")], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    def has_vip(self) -> bool:
        return f"{VIP}/24" in self.host.run(["ip", "-4", "addr", "show", "dev", "wan0"]).stdout

    def stop(self) -> None:
        if self.proc is not None:
            self.host.stop(self.proc)


def check_sealed(db: RedisServer, key_file: Path, node: str, kind: str = "esp.sa", at_least: int = 4,
                 fields: tuple[str, ...] = ("enc_key", "integ_key")) -> None:
    """The node's records of ``kind`` (ESP SAs) are in Redis only sealed: each twin opens with the
    key file into a record with its keys, and those keys appear nowhere in Redis in the clear (raw,
    hex or base64)."""
    key = ClusterKey.from_file(key_file)
    twins = db.cli("--scan", "--pattern", "c:r:cluster.sealed:*").split()
    sas = []
    for t in twins:
        row = json.loads(db.cli("hget", t, "d"))
        if row["node"] != node or row["kind"] != kind:
            continue
        blob = base64.b64decode(row["blob"]["$b"])
        sas.append(json.loads(key.open(blob, f"narsuite sealed {node} {row['kind']} {row['key']}".encode())))
    assert len(sas) >= at_least, sas  # (ESP: two clients, an inbound and an outbound SA each)
    dump = db.cli("--scan").split()
    everything = "".join(db.cli("dump", k) for k in dump if not k.startswith("c:log"))
    everything += db.cli("xrange", "c:log", "-", "+")
    for sa in sas:
        for f in fields:
            raw = base64.b64decode(sa[f]["$b"]) if isinstance(sa[f], dict) else b""
            if raw:
                assert raw.hex() not in everything and base64.b64encode(raw).decode() not in everything


def failover_lab(lab):  # type: ignore[no-untyped-def]
    """The failover topology every gateway test here shares: NAT1 (masquerading its wan0) on the
    public subnet with the two gateways G1 and G2, which share the internal subnet with H and
    the Redis host DB; rp_filter off on the gateways (the public address moves between them).
    The client side of NAT1 (its lan0) is each test's own."""
    nat1 = lab.host("nat1")
    g1, g2 = lab.host("g1", forwarding=True), lab.host("g2", forwarding=True)
    h, dbh = lab.host("h"), lab.host("db")
    # G1 and G2 have their own addresses in another subnet on wan0 (VRRP adverts go from there);
    # the public address, the only one of its subnet on a gateway, is what replies come from
    lab.switch("pub", [(nat1, "198.51.100.101/24", "wan0"), (g1, "203.0.113.2/24", "wan0"),
                       (g2, "203.0.113.3/24", "wan0")])
    lab.switch("int", [(g1, "10.1.0.2/24", "lan0"), (g2, "10.1.0.3/24", "lan0"),
                       (h, "10.1.0.10/24", "eth0"), (dbh, "10.1.0.20/24", "eth0")])
    nat1.masquerade("wan0")
    h.default_route(VIP_INT)
    for g in (g1, g2):
        g.run(["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"])
    return types.SimpleNamespace(nat1=nat1, g1=g1, g2=g2, h=h, dbh=dbh)


def cluster_store(dbh, tmp_path: Path) -> tuple[RedisServer, str, Path]:  # type: ignore[no-untyped-def]
    """The cluster key file (0600) and the shared Redis on DB; the caller closes the server."""
    key_file = tmp_path / "cluster.key"
    key_file.write_bytes(os.urandom(32))
    key_file.chmod(0o600)
    db = RedisServer(6379, host="10.1.0.20", prefix=["ip", "netns", "exec", dbh.netns]).start()
    return db, f"redis://10.1.0.20:{db.port}", key_file


def test_e_level1_failover_kill_active_client_reconnects_to_standby_same_address(need_strongswan, lab, tmp_path):
    t = failover_lab(lab)
    nat1, g1, g2 = t.nat1, t.g1, t.g2
    r1, r3 = lab.host("r1"), lab.host("r3")
    lab.switch("lan", [(nat1, "192.168.1.1/24", "lan0"), (r1, "192.168.1.10/24", "eth0"),
                       (r3, "192.168.1.11/24", "eth0")])
    r1.default_route("192.168.1.1")
    r3.default_route("192.168.1.1")
    db, url, key_file = cluster_store(t.dbh, tmp_path)
    try:
        n1 = NarsuiteDaemon(g1, node_config(tmp_path, "g1", url, key_file), roles="esp,ike").start()
        n2 = NarsuiteDaemon(g2, node_config(tmp_path, "g2", url, key_file), roles="esp,ike").start()
        # keepalived (VRRPv3) on both: the addresses follow a live narsuite daemon
        k1 = Keepalived(g1, tmp_path / "k1", 150, n1).start()
        wait(lambda: k1.has_vip(), 15, "g1 to take the addresses")
        k2 = Keepalived(g2, tmp_path / "k2", 100, n2).start()
        # bob first, so alice's address is not the first of the pool: a standby that did not
        # share the store would hand alice the first free address (bob's)
        b = Charon(r3, tmp_path / "r3").start()
        b.load(ikev1_client_conf(VIP, PSK, local_id="r3.example", xauth_user="bob", xauth_password="bob-pw"))
        assert b.initiate(child="net", timeout=25).ok
        (bob_vip,) = b.list_sas()[0].local_vips
        c = Charon(r1, tmp_path / "r1").start()
        c.load(ikev1_client_conf(VIP, PSK, local_id="r1.example", xauth_user="alice", xauth_password="alice-pw"))
        res = c.initiate(child="net", timeout=25)
        assert res.ok, res.output[-3000:]
        (vip,) = c.list_sas()[0].local_vips
        assert vip != bob_vip
        assert ping(r1, "10.1.0.10")
        assert sorted(r["user"] for r in n1.rows("ike", "sas")) == ["alice", "bob"] and n2.rows("ike", "sas") == []
        cluster = n2.json("cluster")
        assert {r["node"].split()[0] for r in cluster["rows"]} == {"g1", "g2"}, cluster
        check_sealed(db, key_file, "g1")
        held_by_g1 = [r for r in records(db) if r[2] == "g1"]
        assert any(o.startswith("ike:sa:") for _k, o, _n in held_by_g1), held_by_g1  # SPI leases of its SAs

        # the active's daemon dies (kill -9): its keepalived sees it gone and gives the addresses
        # up; the standby's takes them (gratuitous ARP to NAT1 and H)
        t0 = time.monotonic()
        n1.kill9()
        wait(lambda: k2.has_vip() and not k1.has_vip(), 15, "the addresses to move to g2")
        moved = time.monotonic() - t0
        # the client notices (here: the test reconnects it at once; DPD would do it by itself)
        c.terminate(ike="home", timeout=2)
        res = c.initiate(child="net", timeout=25)
        assert res.ok, res.output[-3000:] + n2.log_text()[-3000:]
        outage = time.monotonic() - t0
        (vip2,) = c.list_sas()[0].local_vips
        assert vip2 == vip  # the same pool address from the standby (not bob's, the first one)
        assert ping(r1, "10.1.0.10")
        assert [r["user"] for r in n2.rows("ike", "sas")] == ["alice"]
        # nothing the dead node's SAs held stays allocated: only alice's durable address lease
        deadline = time.monotonic() + 5
        while True:
            left = [(k, o) for k, o, n in records(db) if n == "g1"]
            # (sealed twins of its ESP SAs are not allocations: they stay for a standby to adopt,
            # until the SA's lifetime ends)
            if all(o.startswith(("ike:lease:", "cluster:sealed:g1")) for _k, o in left):
                break
            assert time.monotonic() < deadline, left
            time.sleep(0.2)
        assert {o for _k, o in left} - {"cluster:sealed:g1"} == {"ike:lease:rw:user:alice", "ike:lease:rw:user:bob"}
        assert {r["node"].split()[0] for r in n2.json("cluster")["rows"]} == {"g2"}
        print(f"\nlevel 1 failover: kill -9 to the addresses on the standby (keepalived) {moved * 1000:.0f} ms; "
              f"to the client re-established there with {vip2}: {outage * 1000:.0f} ms "
              f"(client reconnect driven by the test)")
        c.stop()
        b.stop()
        n2.terminate()
        k1.stop()
        k2.stop()
    finally:
        db.close()


TCP_BYTES = 25_600 * 120  # whole blocks
PACED_SERVER = textwrap.dedent(f"""
    import socket, time
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 5001)); s.listen(1)
    c, _ = s.accept()
    block = bytes(range(256)) * 100
    for _ in range({TCP_BYTES} // len(block)):  # 25,600 bytes every 50 ms: 6 s
        c.sendall(block); time.sleep(0.05)
    c.close()
    """)
RECEIVER = textwrap.dedent("""
    import socket
    s = socket.create_connection(("10.1.0.10", 5001), timeout=30)
    data = bytearray()
    while True:
        b = s.recv(65536)
        if not b: break
        data += b
    ok = data == bytes(range(256)) * (len(data) // 256)
    print("OK" if ok else "CORRUPT", len(data))
    """)


def ike_stats(node: NarsuiteDaemon) -> dict[str, int]:
    return {r["counter"]: int(r["value"]) for r in node.rows("ike", "stats")}


def kill_active_under_traffic(r1, h, n1, k1, k2) -> tuple[str, str, float, int, int]:  # type: ignore[no-untyped-def]
    """``kill -9`` the active node N1 while R1 pings H every 20 ms (400 pings) and H sends R1 a
    paced TCP transfer (6 s), both through the tunnel; waits for keepalived to move the
    addresses to the standby.  Returns the ping's output, the receiver's, the seconds from the
    kill until the addresses moved, and the pings sent and answered."""
    pinger = r1.popen(["ping", "-n", "-i", "0.02", "-c", "400", "-W", "1", "10.1.0.10"],
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = h.popen([sys.executable, "-c", PACED_SERVER])
    h.wait_port(5001)
    receiver = r1.popen([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True)
    time.sleep(2)
    t0 = time.monotonic()
    n1.kill9()
    wait(lambda: k2.has_vip() and not k1.has_vip(), 15, "the addresses to move to g2")
    moved = time.monotonic() - t0
    out, _ = pinger.communicate(timeout=60)
    tcp, _ = receiver.communicate(timeout=60)
    h.stop(server)
    sent = int(re.search(r"(\d+) packets transmitted", out).group(1))
    received = int(re.search(r"(\d+) received", out).group(1))
    return out, tcp, moved, sent, received


def same_sas_on_the_client(c, before):  # type: ignore[no-untyped-def]
    """The client's IKE SA (unique id, SPIs) and CHILD SAs (inbound SPIs) are the ones it had
    ``before``: nothing was renegotiated.  Returns its SA now."""
    (after,) = c.list_sas()
    assert after.established and after.children and before.children
    assert [ch.spi_in for ch in after.children] == [ch.spi_in for ch in before.children]
    assert (after.uniqueid, after.spi_i, after.spi_r) == (before.uniqueid, before.spi_i, before.spi_r)
    return after


def test_e_level2_failover_the_standby_carries_on_the_isakmp_and_esp_sas(need_strongswan, lab, tmp_path):
    """Level 2: the standby adopts the dead active's sealed ISAKMP SA and ESP SAs (keepalived's
    notify_master runs `narctl cluster adopt`): no new Main Mode, no new Quick Mode; a ping running
    through the tunnel across the kill -9 loses only the packets of the outage, which is measured;
    then, under the same ISAKMP SA (same cookies on the client), the standby answers the client's
    DPD, its Quick Mode rekey of the CHILD SA and its Delete of the old one."""
    t = failover_lab(lab)
    g1, g2, h = t.g1, t.g2, t.h
    r1 = lab.host("r1")
    lab.link(t.nat1, r1, "192.168.1.1/24", "192.168.1.10/24", a_if="lan0", b_if="eth0")
    r1.default_route("192.168.1.1")
    db, url, key_file = cluster_store(t.dbh, tmp_path)
    try:
        n1 = NarsuiteDaemon(g1, node_config(tmp_path, "g1", url, key_file), roles="esp,ike").start()
        n2 = NarsuiteDaemon(g2, node_config(tmp_path, "g2", url, key_file), roles="esp,ike").start()
        narctl = shutil.which("narctl")
        k1 = Keepalived(g1, tmp_path / "k1", 150, n1, f"{narctl} --socket {n1.socket} cluster adopt").start()
        wait(lambda: k1.has_vip(), 15, "g1 to take the addresses")
        k2 = Keepalived(g2, tmp_path / "k2", 100, n2, f"{narctl} --socket {n2.socket} cluster adopt").start()
        # (IKEv1: the client deletes a rekeyed CHILD SA at once only when told to)
        c = Charon(r1, tmp_path / "r1", extra_conf="  delete_rekeyed = yes\n").start()
        c.load(ikev1_client_conf(VIP, PSK, local_id="r1.example", xauth_user="alice", xauth_password="alice-pw",
                                 dpd_delay="2s"))
        assert c.initiate(child="net", timeout=25).ok
        (before,) = c.list_sas()
        assert ping(r1, "10.1.0.10")
        # g1 sealed the ISAKMP SA too (adopting it is what keeps the client's DPD and rekeys working)
        wait(lambda: any("ike.isakmp" in k for k, _o, n in records(db) if n == "g1"), 5, "g1's sealed ISAKMP SA")
        # a ping every 20 ms and a paced TCP transfer (H -> R1, 6 s) through the tunnel, across the kill
        out, tcp, moved, sent, received = kill_active_under_traffic(r1, h, n1, k1, k2)
        lost = sent - received
        adopt_log = (tmp_path / "k2" / "log").read_text()
        assert received > sent - 100, out[-2000:] + adopt_log[-2000:] + n2.log_text()[-3000:]
        assert " 399 " in out or "icmp_seq=400 " in out or "icmp_seq=399 " in out  # still answered at the end
        assert tcp.split() == ["OK", str(TCP_BYTES)], tcp  # every byte, in order, one connection
        # the same ISAKMP SA and CHILD SA on the client: nothing was renegotiated
        after = same_sas_on_the_client(c, before)
        same_ike = (before.uniqueid, before.spi_i, before.spi_r)
        # the standby carries that ISAKMP SA (same cookies) with alice's address; it ran no Main Mode
        (row,) = n2.rows("ike", "sas")
        assert (row["name"], row["user"], row["address"]) == (before.spi_i.hex()[:8] + before.spi_r.hex()[:8],
                                                              "alice", after.local_vips[0]), row
        stats = ike_stats(n2)
        assert stats.get("ike_resumed") == 1 and not stats.get("ike_established"), stats
        assert ping(r1, "10.1.0.10")
        # DPD: the tunnel idles, the client probes the gateway (R-U-THERE under the ISAKMP SA): the
        # standby answers (on the old code it dropped the unknown cookies and the client, after its
        # DPD timeout, would have started a new Main Mode)
        wait(lambda: ike_stats(n2).get("dpd_answered", 0) >= 1, 20, "the standby to answer the client's DPD")
        # a Quick Mode rekey of the CHILD SA under the same ISAKMP SA, then the Delete of the old one
        old_spis = {ch.spi_in for ch in after.children}
        c.swanctl("--rekey", "--child", "net")

        def rekeyed() -> bool:
            (sa,) = c.list_sas()
            return any(ch.spi_in not in old_spis and ch.state == "INSTALLED" for ch in sa.children)
        try:
            wait(rekeyed, 20, "the CHILD SA rekey against the standby")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{c.list_sas_text()}\n{c.log_text()[-4000:]}\n{n2.log_text()[-3000:]}") from None
        wait(lambda: ike_stats(n2).get("delete_rx", 0) >= 1, 20, "the client's Delete of the old CHILD SA")
        (rekeyed_sa,) = c.list_sas()
        assert [ch.spi_in not in old_spis for ch in rekeyed_sa.children] == [True], c.list_sas_text()
        stats = ike_stats(n2)
        assert stats.get("child_installed") == 1 and stats.get("child_deleted") == 1, stats
        assert not stats.get("bad_hash") and not stats.get("decrypt_failed") and not stats.get("unknown_cookie"), stats
        assert ping(r1, "10.1.0.10")  # through the new pair
        assert (rekeyed_sa.uniqueid, rekeyed_sa.spi_i, rekeyed_sa.spi_r) == same_ike
        assert c.log_text().count("initiating Main Mode") == 1, c.log_text()[-3000:]
        print(f"\nlevel 2 failover: addresses moved {moved * 1000:.0f} ms after kill -9; ping every 20 ms: "
              f"{lost} of {sent} lost = {lost * 20} ms outage; TCP transfer of {TCP_BYTES} bytes across the kill "
              f"complete; no new Main Mode or Quick Mode; then DPD answered, CHILD SA rekeyed (Quick Mode) and "
              f"the old one deleted under the same ISAKMP SA on the standby")
        c.stop()
        n2.terminate()
        k1.stop()
        k2.stop()
    finally:
        db.close()


PSK2 = "lab-psk-v2-0123456789"
IKEV2_POLICY = f"""
    [[ike.peers]]
    name = "rw2"
    versions = [2]
    psk = "{PSK2}"
    local_id = "gw.example"
    local_ts = ["10.1.0.0/24"]
    pool = "ra"
    """


def v2_stats(node: NarsuiteDaemon) -> dict[str, int]:
    return {k[3:]: v for k, v in ike_stats(node).items() if k.startswith("v2 ")}


@contextlib.contextmanager
def ikev2_cluster(lab, tmp_path: Path) -> Iterator[types.SimpleNamespace]:  # type: ignore[no-untyped-def]
    """Two nodes (IKEv2 policy "rw2", gateway liveness after 4 idle seconds), Redis, keepalived with
    ``narctl cluster adopt`` on becoming master, and a strongSwan IKEv2 client (PSK, virtual IP,
    DPD after 3 idle seconds) behind NAT1 connected to g1, whose IKE SA g1 has sealed."""
    t = failover_lab(lab)
    g1, g2, h = t.g1, t.g2, t.h
    r1 = lab.host("r1")
    lab.link(t.nat1, r1, "192.168.1.1/24", "192.168.1.10/24", a_if="lan0", b_if="eth0")
    r1.default_route("192.168.1.1")
    db, url, key_file = cluster_store(t.dbh, tmp_path)
    try:
        # the gateway probes an idle client after 4 s (its own INFORMATIONAL requests: the message
        # ID direction a standby cannot guess)
        cfgs = [node_config(tmp_path, n, url, key_file, IKEV2_POLICY) for n in ("g1", "g2")]
        for cfg in cfgs:
            text = cfg.read_text().replace("[ike]\n", "[ike]\ndpd_delay = 4\n", 1)
            cfg.write_text(text)
        n1 = NarsuiteDaemon(g1, cfgs[0], roles="esp,ike").start()
        n2 = NarsuiteDaemon(g2, cfgs[1], roles="esp,ike").start()
        narctl = shutil.which("narctl")
        k1 = Keepalived(g1, tmp_path / "k1", 150, n1, f"{narctl} --socket {n1.socket} cluster adopt").start()
        wait(lambda: k1.has_vip(), 15, "g1 to take the addresses")
        k2 = Keepalived(g2, tmp_path / "k2", 100, n2, f"{narctl} --socket {n2.socket} cluster adopt").start()
        c = Charon(r1, tmp_path / "r1").start()
        c.load(ikev2_client_conf(VIP, PSK2, local_id="r1.example", connection_extra="    dpd_delay = 3s\n"))
        res = c.initiate(child="net", timeout=25)
        assert res.ok, res.output[-3000:] + c.log_text()[-3000:]
        (before,) = c.list_sas()
        assert ping(r1, "10.1.0.10")
        wait(lambda: any("ike.v2sa" in k for k, _o, n in records(db) if n == "g1"), 5, "g1's sealed IKE SA")
        yield types.SimpleNamespace(r1=r1, h=h, db=db, key_file=key_file, n1=n1, n2=n2, k1=k1, k2=k2, c=c,
                                    before=before)
    finally:
        db.close()


def test_e_level2_failover_ikev2_the_standby_carries_on_the_ike_sa_and_child_sas(need_strongswan, lab, tmp_path):
    """Level 2 for IKEv2: the standby adopts the dead active's sealed IKE SA (``ike.v2sa``) and
    CHILD SAs: no new IKE_SA_INIT or IKE_AUTH; it resynchronises the message IDs with the client
    (RFC 6311, which strongSwan supports); a ping and a TCP transfer through the tunnel survive the
    kill -9, the outage is measured; then, under the same IKE SA (same unique id and SPIs on the
    client), the standby's own liveness check is answered, the client's DPD is answered and its
    CHILD SA rekey completes (and the old CHILD SA is deleted)."""
    with ikev2_cluster(lab, tmp_path) as t:
        r1, h, db, key_file, n1, n2, k1, k2, c, before = (t.r1, t.h, t.db, t.key_file, t.n1, t.n2, t.k1, t.k2, t.c,
                                                           t.before)
        # its keys (SK_d, SK_a*, SK_e*, SK_p*) only sealed, nowhere in Redis in the clear
        check_sealed(db, key_file, "g1", "ike.v2sa", 1, ("sk_d", "sk_ai", "sk_ar", "sk_ei", "sk_er", "sk_pi", "sk_pr"))
        # a ping every 20 ms and a paced TCP transfer (H -> R1, 6 s) through the tunnel, across the kill
        out, tcp, moved, sent, received = kill_active_under_traffic(r1, h, n1, k1, k2)
        lost = sent - received
        adopt_log = (tmp_path / "k2" / "log").read_text()
        assert received > sent - 100, out[-2000:] + adopt_log[-2000:] + n2.log_text()[-3000:]
        assert tcp.split() == ["OK", str(TCP_BYTES)], tcp  # every byte, in order, one connection
        # the same IKE SA and CHILD SA on the client: nothing was renegotiated
        after = same_sas_on_the_client(c, before)
        same_ike = (before.uniqueid, before.spi_i, before.spi_r)
        (row,) = n2.rows("ike", "sas")
        assert (row["name"], row["address"]) == (before.spi_i.hex()[:8] + before.spi_r.hex()[:8],
                                                 after.local_vips[0]), row
        # the message IDs were resynchronised with the client (RFC 6311) and no SA was made anew
        stats = v2_stats(n2)
        assert stats.get("ike_resumed") == 1 and stats.get("mid_synced") == 1, stats
        # its pool address is still the client's (the lease is durable, now held for the standby's SA)
        leases = {o for _k, o, _n in records(db) if o.startswith("ike:lease:rw2:")}
        assert leases == {"ike:lease:rw2:r1.example@198.51.100.101:4500"}, leases
        assert not stats.get("ike_established") and not stats.get("sa_init_answered"), stats
        assert ping(r1, "10.1.0.10")
        # idle: the standby's own liveness check (under the synced ID) and the client's DPD
        # (strongSwan: an empty INFORMATIONAL after 3 s idle) are answered
        wait(lambda: v2_stats(n2).get("liveness_answered", 0) >= 1, 20, "the client to answer our liveness check")

        def client_dpd_answered() -> bool:
            log = c.log_text()
            cut = log.rfind("requested MID sync")
            return "sending DPD request" in log[cut:] and "parsed INFORMATIONAL response" in log[cut:]
        try:
            wait(client_dpd_answered, 20, "the client's DPD answered by the standby")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{c.log_text()[-4000:]}") from None
        # a CHILD SA rekey by the client under the same IKE SA; strongSwan deletes the old one
        old_spis = {ch.spi_in for ch in after.children}
        c.swanctl("--rekey", "--child", "net")

        def rekeyed() -> bool:
            (sa,) = c.list_sas()
            return [ch.spi_in not in old_spis and ch.state == "INSTALLED" for ch in sa.children] == [True]
        try:
            wait(rekeyed, 20, "the CHILD SA rekey against the standby")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{c.list_sas_text()}\n{c.log_text()[-4000:]}\n{n2.log_text()[-3000:]}") \
                from None
        stats = v2_stats(n2)
        assert stats.get("child_installed") == 1 and stats.get("child_deleted", 0) >= 1, stats
        assert not stats.get("decrypt_failed") and not stats.get("unknown_spi") and not stats.get("resume_failed"), \
            stats
        assert ping(r1, "10.1.0.10")  # through the new pair
        (rekeyed_sa,) = c.list_sas()
        assert (rekeyed_sa.uniqueid, rekeyed_sa.spi_i, rekeyed_sa.spi_r) == same_ike
        log = c.log_text()
        # one IKE_SA_INIT and one IKE_AUTH in the client's whole life: those of the first connection
        assert log.count("generating IKE_SA_INIT request") == 1, log[-3000:]
        assert log.count("generating IKE_AUTH request") == 1, log[-3000:]
        assert log.count("sending DPD request") >= 1
        # and an IKE SA rekey by the client: the standby derives the new SA from the carried-on SK_d,
        # the CHILD SA moves to it, and the new SA's state is sealed as the standby's own
        c.swanctl("--rekey", "--ike", "home")

        def ike_rekeyed() -> bool:
            sas = c.list_sas()
            return len(sas) == 1 and sas[0].spi_i != before.spi_i and sas[0].established and bool(sas[0].children)
        try:
            wait(ike_rekeyed, 20, "the IKE SA rekey against the standby")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{c.list_sas_text()}\n{c.log_text()[-4000:]}\n{n2.log_text()[-3000:]}") \
                from None
        (new_ike,) = c.list_sas()
        assert v2_stats(n2).get("ike_rekeyed") == 1 and ping(r1, "10.1.0.10")
        spis = (new_ike.spi_i + new_ike.spi_r).hex()
        wait(lambda: any("ike.v2sa" in k and spis in k for k, _o, n in records(db) if n == "g2"), 5,
             "the rekeyed IKE SA sealed by g2")
        log = c.log_text()
        assert log.count("generating IKE_SA_INIT request") == 1 and log.count("generating IKE_AUTH request") == 1
        print(f"\nlevel 2 failover (IKEv2): addresses moved {moved * 1000:.0f} ms after kill -9; ping every 20 ms: "
              f"{lost} of {sent} lost = {lost * 20} ms outage; TCP transfer of {TCP_BYTES} bytes across the kill "
              f"complete; no new IKE_SA_INIT or IKE_AUTH; message IDs synchronised (RFC 6311); then our "
              f"liveness check and the client's DPD answered, the CHILD SA rekeyed under the same IKE SA, then the "
              f"IKE SA rekeyed")
        c.stop()
        n2.terminate()
        k1.stop()
        k2.stop()


def test_e_level2_failover_ikev2_a_client_request_in_flight_at_the_kill_completes_on_the_standby(
        need_strongswan, lab, tmp_path):
    """The client starts a CHILD SA rekey just as the active dies: its CREATE_CHILD_SA goes to a dead
    node and is never answered there.  The standby's RFC 6311 sync tells the client to go on past
    that message ID; strongSwan resends the rekey under the agreed ID and the standby completes it,
    under the same IKE SA, instead of the client giving up on the gateway after its retransmits."""
    with ikev2_cluster(lab, tmp_path) as t:
        c, n2, before = t.c, t.n2, t.before
        old_spis = {ch.spi_in for ch in before.children}
        t.n1.kill9()
        c.swanctl("--rekey", "--child", "net")  # in flight to the dead active
        t0 = time.monotonic()
        wait(lambda: t.k2.has_vip() and not t.k1.has_vip(), 15, "the addresses to move to g2")

        def installed() -> bool:
            (sa,) = c.list_sas()
            return any(ch.spi_in not in old_spis and ch.state == "INSTALLED" for ch in sa.children)

        def old_gone() -> bool:  # (strongSwan removes the old pair delete_rekeyed_delay, 5 s, later)
            (sa,) = c.list_sas()
            return [ch.spi_in not in old_spis and ch.state == "INSTALLED" for ch in sa.children] == [True]
        try:
            wait(installed, 30, "the client's rekey to complete against the standby")
            took = time.monotonic() - t0
            wait(old_gone, 30, "the old CHILD SA to go")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{c.list_sas_text()}\n{c.log_text()[-5000:]}\n{n2.log_text()[-3000:]}") \
                from None
        (after,) = c.list_sas()
        assert (after.uniqueid, after.spi_i, after.spi_r) == (before.uniqueid, before.spi_i, before.spi_r)
        stats = v2_stats(n2)
        assert stats.get("ike_resumed") == 1 and stats.get("mid_synced") == 1 and stats.get("child_installed") == 1, \
            stats
        log = c.log_text()
        assert "requested MID sync" in log and log.count("generating IKE_SA_INIT request") == 1, log[-3000:]
        assert ping(t.r1, "10.1.0.10")  # through the new pair
        print(f"\nlevel 2 failover (IKEv2), a client rekey in flight at the kill: the new CHILD SA installed on the "
              f"client {took * 1000:.0f} ms after the kill, same IKE SA")
        c.stop()
        n2.terminate()
        t.k1.stop()
        t.k2.stop()
