"""The strongSwan harness (narsuite.lab.strongswan): a real charon on both ends of the lab.

Why these tests: the product tests will trust this harness to put a real IKEv1 peer in a
namespace (as client against our responder, as responder against our test initiator), so
it must be shown to negotiate for real -- IKE SA, NAT-T float to 4500 through NAT1, CHILD SA
that carries a ping from R1 to H -- and to leave no daemon behind.  The XAUTH + mode-config
case is the exact client configuration the product tests will point at our gateway.
"""

from __future__ import annotations

import os
import time

from narsuite.lab import Lab, remote_access_topology
from narsuite.lab.strongswan import (
    Charon,
    ikev1_client_conf,
    ikev1_gateway_conf,
    parse_list_sas,
)

PSK = "lab-psk-0123456789"


def charon_pids(netns: str) -> list[int]:
    """PIDs of processes named charon living in the namespace ``netns``."""
    try:
        target = os.stat(f"/run/netns/{netns}")
    except FileNotFoundError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() != "charon":
                    continue
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            found.append(int(entry))
    return found


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def wait_gone(pids, timeout=5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if pid_alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def test_parse_list_sas_raw():
    raw = (
        "list-sa event {home {uniqueid=1 version=1 state=ESTABLISHED local-host=192.168.1.10 local-port=4500 "
        "local-id=r1.example remote-host=198.51.100.1 remote-port=4500 remote-id=gw.example initiator=yes "
        "initiator-spi=776bd85154e97194 responder-spi=42d9da73c7b9a0cf nat-local=yes nat-remote=yes nat-any=yes "
        "encr-alg=AES_CBC encr-keysize=128 integ-alg=HMAC_SHA1_96 prf-alg=PRF_HMAC_SHA1 dh-group=MODP_2048 "
        "established=0 rekey-time=13766 local-vips=[10.9.0.1] child-sas {net-1 {name=net uniqueid=1 reqid=1 "
        "state=INSTALLED mode=TUNNEL protocol=ESP encap=yes spi-in=77a09c30 spi-out=7eb3d806 encr-alg=AES_GCM_16 "
        "encr-keysize=128 bytes-in=84 packets-in=1 bytes-out=84 packets-out=1 local-ts=[10.9.0.1/32] "
        "remote-ts=[10.1.0.0/24 10.2.0.0/16]}}}}\nlist-sas reply {}\n"
    )
    (sa,) = parse_list_sas(raw)
    assert sa.established and sa.version == 1 and sa.initiator
    assert sa.spi_i == bytes.fromhex("776bd85154e97194") and sa.spi_r == bytes.fromhex("42d9da73c7b9a0cf")
    assert (sa.local_port, sa.remote_port, sa.nat_local, sa.nat_remote) == (4500, 4500, True, True)
    assert sa.local_vips == ("10.9.0.1",) and sa.encr == "AES_CBC-128" and sa.dh_group == "MODP_2048"
    (child,) = sa.children
    assert (child.name, child.state, child.encap, child.spi_in, child.spi_out) == (
        "net", "INSTALLED", True, 0x77A09C30, 0x7EB3D806)
    assert child.remote_ts == ("10.1.0.0/24", "10.2.0.0/16") and child.local_ts == ("10.9.0.1/32",)
    assert child.encr == "AES_GCM_16-128" and child.integ == "" and child.packets_in == 1


def test_ikev1_main_mode_psk_through_nat(need_strongswan, ra_topo, tmp_path):
    t = ra_topo
    gw = Charon(t.g, tmp_path / "g").start()
    client = Charon(t.r1, tmp_path / "r1").start()
    gw.load(ikev1_gateway_conf(t.g_public, PSK, remote_ts=t.private_net))
    client.load(ikev1_client_conf(t.g_public, PSK, local_id="r1.example"))

    res = client.initiate(child="net", timeout=20)
    assert res.ok, res.output + client.log_text()[-3000:]
    assert "Main Mode" in res.output

    (csa,) = client.list_sas()
    assert csa.established and csa.version == 1 and csa.initiator
    # floated to 4500 after NAT-D showed NAT1 in the path
    assert (csa.local_port, csa.remote_port) == (4500, 4500)
    assert csa.nat_local
    (cchild,) = csa.children
    assert cchild.state == "INSTALLED" and cchild.encap and cchild.mode == "TUNNEL"
    assert cchild.remote_ts == (t.internal_net,) and cchild.local_ts == (f"{t.r1_addr}/32",)

    gsa = gw.wait_sa()
    # G sees NAT1's public address, on 4500, and a real (not faked) NAT on the remote side
    assert gsa.remote_host == t.nat1_public and gsa.remote_port == 4500
    assert gsa.nat_remote and not gsa.nat_local
    assert (gsa.spi_i, gsa.spi_r) == (csa.spi_i, csa.spi_r)
    (gchild,) = gsa.children
    assert (gchild.spi_in, gchild.spi_out) == (cchild.spi_out, cchild.spi_in)

    # NAT1 holds a UDP 4500 flow from R1 to G
    ct = t.nat1.run(["conntrack", "-L", "-p", "udp", "--dport", "4500"], check=False).stdout
    assert t.g_public in ct, ct

    assert t.r1.ping(t.h_addr, timeout=3), client.log_text()[-2000:]
    (cchild,) = client.list_sas()[0].children
    assert cchild.packets_out >= 1 and cchild.packets_in >= 1

    # terminate, then stop: no charon left in either namespace
    assert client.terminate(ike="home").ok
    pids = [gw.pid, client.pid]
    assert all(pids)
    gw.stop()
    client.stop()
    assert wait_gone(pids) == []
    assert charon_pids(t.g.netns) == [] and charon_pids(t.r1.netns) == []
    assert gw.pid is None and client.pid is None


def test_ikev1_xauth_mode_config_client(need_strongswan, ra_topo, tmp_path):
    """The product tests' client: Main Mode PSK + XAUTH (xauth-generic) + mode-config."""
    t = ra_topo
    gw = Charon(t.g, tmp_path / "g").start()
    client = Charon(t.r1, tmp_path / "r1").start()
    gw.load(ikev1_gateway_conf(t.g_public, PSK, pool="10.9.0.0/24", xauth_users={"alice": "alice-pw"}))
    client.load(ikev1_client_conf(t.g_public, PSK, local_id="r1.example",
                                  xauth_user="alice", xauth_password="alice-pw"))

    res = client.initiate(child="net", timeout=20)
    assert res.ok, res.output + client.log_text()[-3000:]
    assert "XAuth authentication of 'alice' (myself) successful" in res.output

    (csa,) = client.list_sas()
    assert csa.established and csa.nat_local and csa.local_port == 4500
    (vip,) = csa.local_vips
    assert vip.startswith("10.9.0.")
    (cchild,) = csa.children
    assert cchild.local_ts == (f"{vip}/32",) and cchild.remote_ts == (t.internal_net,)

    gsa = gw.wait_sa()
    assert gsa.remote_xauth_id == "alice" and gsa.remote_vips == (vip,)

    assert t.r1.ping(t.h_addr, timeout=3), client.log_text()[-2000:]
    assert "installing new virtual IP" in client.log_text()


def test_xauth_wrong_password_fails(need_strongswan, ra_topo, tmp_path):
    t = ra_topo
    gw = Charon(t.g, tmp_path / "g").start()
    client = Charon(t.r1, tmp_path / "r1", extra_conf="  retransmit_tries = 1\n").start()
    gw.load(ikev1_gateway_conf(t.g_public, PSK, pool="10.9.0.0/24", xauth_users={"alice": "alice-pw"}))
    client.load(ikev1_client_conf(t.g_public, PSK, xauth_user="alice", xauth_password="wrong"))
    res = client.initiate(child="net", timeout=10)
    assert not res.ok
    assert not any(sa.established for sa in gw.list_sas())
    assert "XAuth" in gw.log_text()


def test_lab_teardown_kills_a_running_charon(need_strongswan, tmp_path):
    """A test that fails before stop() leaves nothing: the lab's teardown ends charon."""
    with Lab() as lab:
        t = remote_access_topology(lab)
        charon = Charon(t.g, tmp_path / "g").start()
        pid = charon.pid
        assert pid and charon_pids(t.g.netns) == [pid]
    assert wait_gone([pid]) == []
