"""The ike role against a real strongSwan 5.9 client, in the remote-access lab.

R1 (and R3) sit behind NAT1 (nftables masquerade), narsuite runs ``--role=ike,esp`` on G,
H is the internal host.  Each scenario of the issue is here, with real traffic through the
tunnel: (a) Main Mode PSK tunnel, ping and TCP; (b) RSA certificates; (c) XAUTH +
mode-config, two clients behind the same NAT with one group PSK; (d) no NAT between the
client and G; (e) DPD, Delete and a rekey while traffic flows; (f) AES-GCM ESP.  The
captures are read by tshark, which must find nothing malformed.
"""

from __future__ import annotations

import subprocess
import textwrap
import time
from pathlib import Path

import bcrypt
from labtraffic import ping, tcp_transfer, tshark_ipsec

from narsuite.lab.daemon import NarsuiteDaemon
from narsuite.lab.strongswan import Charon, ikev1_client_conf

PSK = "lab-psk-0123456789"
USERS = {"alice": "alice-pw", "bob": "bob-pw"}


def gateway(t, tmp: Path, policy: str, ike_extra: str = "", users: bool = False,
            esp_extra: str = "") -> NarsuiteDaemon:
    cfg = tmp / "narsuite.toml"
    user_table = ""
    if users:
        user_table = "[ike.users]\n" + "".join(
            f'{u} = "{bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()}"\n' for u, p in USERS.items())
    cfg.write_text(textwrap.dedent("""
        [daemon]
        state_dir = "state"
        runtime_dir = "run"
        [metrics]
        enabled = false
        [store.pools.ra]
        network = "10.8.0.0/24"
        exclude = ["10.8.0.1"]
        [esp]
        """) + esp_extra + "\n[ike]\n" + ike_extra + "\n" + user_table + policy)
    t.g.run(["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"])
    return NarsuiteDaemon(t.g, cfg, roles="esp,ike").start()


def psk_policy(**extra: str) -> str:
    lines = {"name": '"rw"', "psk": f'"{PSK}"', "local_id": '"gw.example"', "local_ts": '["10.1.0.0/24"]',
             "trust_client_address": "true"}
    lines.update(extra)
    return "[[ike.peers]]\n" + "".join(f"{k} = {v}\n" for k, v in lines.items())


TRANSFER = 307_200  # bytes, a whole number of the sender's 256-byte blocks


class Capture:
    """dumpcap on a host's interface; ``check()`` runs tshark over it."""

    def __init__(self, host, ifname: str, path: Path, bpf: str = "udp port 500 or udp port 4500 or esp") -> None:
        self.host, self.path = host, path
        self.proc = host.popen(["dumpcap", "-q", "-i", ifname, "-f", bpf, "-w", str(path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)

    def check(self) -> list[str]:
        """Stop, dissect, assert nothing malformed; the frames' protocol stacks."""
        time.sleep(0.3)
        self.host.stop(self.proc)
        out = tshark_ipsec(self.host, self.path, "frame.protocols", "_ws.malformed",
                           "_ws.expert.message")
        lines = [line for line in out.splitlines() if line.strip()]
        assert lines, "nothing captured"
        assert not any("malformed" in line.lower() for line in lines), out
        return [line.split("\t")[0] for line in lines]


def client(t, host, tmp: Path, name: str, **conf) -> Charon:
    c = Charon(host, tmp / name).start()
    conf.setdefault("local_id", f"{name}.example")
    c.load(ikev1_client_conf(t.g_public, PSK, **conf))
    return c


def up(c: Charon, child: str = "net") -> str:
    res = c.initiate(child=child, timeout=25)
    assert res.ok, res.output[-3000:] + c.log_text()[-2000:]
    return res.output


def ike_sas(g: NarsuiteDaemon) -> list[dict]:
    return g.rows("ike", "sas")


def esp_sas(g: NarsuiteDaemon) -> list[dict]:
    return g.rows("esp", "sas")


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------------------------------- (a)
def test_a_main_mode_psk_tunnel_through_nat(need_strongswan, ra_topo, tmp_path):
    t = ra_topo
    g = gateway(t, tmp_path, psk_policy())
    cap = Capture(t.g, "wan0", tmp_path / "a.pcap")
    c = client(t, t.r1, tmp_path, "r1")
    out = up(c)
    assert "Main Mode" in out and "received NAT-T (RFC 3947) vendor ID" in out
    (csa,) = c.list_sas()
    assert csa.established and (csa.local_port, csa.remote_port) == (4500, 4500)
    (cchild,) = csa.children
    assert cchild.encap and cchild.local_ts == (f"{t.r1_addr}/32",) and cchild.remote_ts == ("10.1.0.0/24",)

    (isa,) = ike_sas(g)
    assert isa["remote"] == f"{t.nat1_public}:4500" and isa["state"] == "established"
    assert isa["peer id"] == "r1.example" and isa["nat-t"] == "rfc3947" and "peer" in isa["nat"]
    spis = {(r["dir"], int(r["spi"], 16)) for r in esp_sas(g)}
    assert spis == {("in", cchild.spi_out), ("out", cchild.spi_in)}

    assert ping(t.r1, t.h_addr)
    assert tcp_transfer(t.h, t.r1, t.h_addr, size=TRANSFER) == 307_200
    assert tcp_transfer(t.r1, t.h, t.r1_addr, size=TRANSFER) == 307_200
    (cchild,) = c.list_sas()[0].children
    assert cchild.packets_in > 100 and cchild.packets_out > 100
    protocols = cap.check()
    assert any("isakmp" in p for p in protocols)
    assert any(p.endswith("udpencap:esp") for p in protocols)
    c.stop()
    g.terminate()


# ------------------------------------------------------------------------------------- (b)
def test_b_rsa_certificates(need_strongswan, ra_topo, tmp_path):
    from narsuite.lab.pki import make_pki

    t = ra_topo
    pki = make_pki(tmp_path / "pki")
    alice = pki.clients["alice@example.net"]
    policy = ('[[ike.peers]]\nname = "certs"\nauth = "rsa"\nid = "alice@example.net"\nlocal_id = "%cert"\n'
              'local_ts = ["10.1.0.0/24"]\ntrust_client_address = true\n')
    extra = (f'certificate = "{pki.gateway.cert_path}"\nprivate_key = "{pki.gateway.key_path}"\n'
             f'cacerts = ["{pki.ca_path}"]\n')
    g = gateway(t, tmp_path, policy, ike_extra=extra)
    c = Charon(t.r1, tmp_path / "r1").start()
    files = {f"x509/{alice.cert_path.name}": alice.cert_path.read_bytes(),
             f"x509ca/{pki.ca_path.name}": pki.ca_path.read_bytes(),
             f"private/{alice.key_path.name}": alice.key_path.read_bytes()}
    gw_dn = pki.gateway.cert.subject.rfc4514_string()
    gw_dn_strongswan = ", ".join(reversed([p.strip() for p in gw_dn.split(",")]))
    c.load(textwrap.dedent(f"""\
        connections {{
          home {{
            version = 1
            proposals = aes128-sha256-modp2048
            remote_addrs = {t.g_public}
            local {{
              auth = pubkey
              certs = {alice.cert_path.name}
              id = alice@example.net
            }}
            remote {{
              auth = pubkey
              id = "{gw_dn_strongswan}"
            }}
            children {{
              net {{
                remote_ts = 10.1.0.0/24
                esp_proposals = aes128-sha256
              }}
            }}
          }}
        }}
        """), files=files)
    out = up(c)
    assert "authentication of" in out and "successful" in out
    (isa,) = ike_sas(g)
    assert isa["peer id"] == "alice@example.net" and "rsa" in isa["algorithms"]
    assert ping(t.r1, t.h_addr)
    c.stop()
    g.terminate()


# ------------------------------------------------------------------------------------- (c)
def test_c_xauth_mode_config_two_clients_behind_one_nat(need_strongswan, ra_topo, tmp_path):
    t = ra_topo
    g = gateway(t, tmp_path, psk_policy(xauth="true", pool='"ra"', dns='["10.1.0.53"]',
                                        split_include='["10.1.0.0/24"]'), users=True)
    cap = Capture(t.g, "wan0", tmp_path / "c.pcap")
    c1 = client(t, t.r1, tmp_path, "r1", xauth_user="alice", xauth_password="alice-pw")
    c3 = client(t, t.r3, tmp_path, "r3", xauth_user="bob", xauth_password="bob-pw")
    out = up(c1)
    assert "XAuth authentication of 'alice' (myself) successful" in out
    up(c3)
    (vip1,) = c1.list_sas()[0].local_vips
    (vip3,) = c3.list_sas()[0].local_vips
    assert vip1 != vip3 and vip1.startswith("10.8.0.") and vip3.startswith("10.8.0.")
    rows = {r["user"]: r for r in ike_sas(g)}
    assert set(rows) == {"alice", "bob"}
    assert rows["alice"]["address"] == vip1 and rows["bob"]["address"] == vip3
    # both behind NAT1: the same public address, different ports
    assert rows["alice"]["remote"].split(":")[0] == rows["bob"]["remote"].split(":")[0] == t.nat1_public
    assert rows["alice"]["remote"] != rows["bob"]["remote"]
    assert ping(t.r1, t.h_addr) and ping(t.r3, t.h_addr)
    assert tcp_transfer(t.h, t.r3, t.h_addr, size=TRANSFER) == 307_200
    # H sees the pool addresses (the tunnel inner sources), not the NAT's
    assert ping(t.h, vip1) and ping(t.h, vip3)
    cap.check()
    # a wrong password is refused and leaves nothing behind
    bad = Charon(t.r2, tmp_path / "r2", extra_conf="  retransmit_tries = 1\n").start()
    bad.load(ikev1_client_conf(t.g_public, PSK, local_id="r2.example", xauth_user="alice", xauth_password="nope"))
    assert not bad.initiate(child="net", timeout=15).ok
    wait_for(lambda: len(ike_sas(g)) == 2, 10, "the failed XAUTH SA to go")
    stats = {r["counter"]: r["value"] for r in g.rows("ike", "stats")}
    assert stats.get("xauth_failed", 0) >= 1
    for c in (c1, c3, bad):
        c.stop()
    g.terminate()


# ------------------------------------------------------------------------------------- (d)
def test_d_no_nat_between_client_and_gateway(need_strongswan, ra_topo, tmp_path):
    """The client on NAT1 itself (public address, no translation on the way to G).
    strongSwan's kernel-libipsec fakes its NAT-D (it always wants UDP encapsulation), so G
    must see "peer behind NAT" from the hashes -- and nothing on its own side."""
    t = ra_topo
    g = gateway(t, tmp_path, psk_policy(remote_ts=f'["{t.nat1_public}/32"]'))
    c = client(t, t.nat1, tmp_path, "pub")
    up(c)
    (isa,) = ike_sas(g)
    assert isa["remote"].split(":")[0] == t.nat1_public
    assert "local" not in isa["nat"]
    assert ping(t.nat1, t.h_addr)
    c.stop()
    g.terminate()


# ------------------------------------------------------------------------------------- (e)
def test_e_rekey_while_traffic_flows_then_delete(need_strongswan, ra_topo, tmp_path):
    t = ra_topo
    g = gateway(t, tmp_path, psk_policy(xauth="true", pool='"ra"'), users=True)
    c = Charon(t.r1, tmp_path / "r1").start()
    conf = ikev1_client_conf(t.g_public, PSK, local_id="r1.example", xauth_user="alice", xauth_password="alice-pw")
    lifetimes = "        rekey_time = 5s\n        rand_time = 0s\n        life_time = 30s\n"
    conf = conf.replace("        esp_proposals", lifetimes + "        esp_proposals")
    c.load(conf)
    up(c)
    (vip,) = c.list_sas()[0].local_vips
    first = {int(r["spi"], 16) for r in esp_sas(g) if r["dir"] == "in"}
    pinger = t.h.popen(["ping", "-i", "0.1", "-c", "150", "-W", "1", vip], stdout=subprocess.PIPE, text=True)
    out, _ = pinger.communicate(timeout=40)
    received = int(out.split(" received")[0].rsplit(" ", 1)[-1])
    assert received >= 140, out  # a rekey or two on the way, at most a few packets lost
    now = {int(r["spi"], 16) for r in esp_sas(g) if r["dir"] == "in"}
    assert now - first, "no rekeyed inbound SA"
    stats = {r["counter"]: r["value"] for r in g.rows("ike", "stats")}
    assert stats["child_installed"] >= 2
    # strongSwan keeps a rekeyed IKEv1 child until it expires (charon.delete_rekeyed = no):
    # the old inbound SA still accepts late packets, only the newest outbound one is used
    assert len([r for r in esp_sas(g) if r["dir"] == "out"]) == 1
    # the client goes away politely: Delete for the child and the ISAKMP SA
    assert c.terminate(ike="home").ok
    wait_for(lambda: not ike_sas(g) and not esp_sas(g), 10, "SAs to be deleted")
    c.stop()
    g.terminate()


def test_e_dpd_answers_and_clears_a_dead_peer(need_strongswan, ra_topo, tmp_path):
    t = ra_topo
    g = gateway(t, tmp_path, psk_policy(), ike_extra="dpd_delay = 2\ndpd_timeout = 6\n")
    c = Charon(t.r1, tmp_path / "r1").start()
    c.load(ikev1_client_conf(t.g_public, PSK, local_id="r1.example").replace(
        "    version = 1\n", "    version = 1\n    dpd_delay = 1s\n"))
    up(c)
    wait_for(lambda: {r["counter"]: r["value"] for r in g.rows("ike", "stats")}.get("dpd_answered", 0) >= 2,
             15, "R-U-THERE answered")
    assert ping(t.r1, t.h_addr)
    # the client dies without a word (SIGKILL): G probes, then clears its SAs
    c.proc.kill()
    wait_for(lambda: not ike_sas(g) and not esp_sas(g), 30, "the dead peer's SAs to go")
    stats = {r["counter"]: r["value"] for r in g.rows("ike", "stats")}
    assert stats["dpd_dead"] == 1 and stats["dpd_sent"] >= 1
    c.stop()
    g.terminate()


# ------------------------------------------------------------------------------------- (f)
def test_f_aes_gcm_esp(need_strongswan, ra_topo, tmp_path):
    t = ra_topo
    g = gateway(t, tmp_path, psk_policy())
    cap = Capture(t.g, "wan0", tmp_path / "f.pcap")
    c = client(t, t.r1, tmp_path, "r1", esp_proposals="aes128gcm16", proposals="aes256-sha256-ecp256")
    up(c)
    (cchild,) = c.list_sas()[0].children
    assert cchild.encr.startswith("AES_GCM_16")
    assert {r["transform"] for r in esp_sas(g)} == {"aes-gcm-16-128/-"}  # with the key size
    assert ping(t.r1, t.h_addr)
    assert tcp_transfer(t.h, t.r1, t.h_addr, size=TRANSFER) == 307_200
    cap.check()
    c.stop()
    g.terminate()


# ------------------------------------------------------------------------- more of the same
def test_aggressive_mode_with_pfs(need_strongswan, ra_topo, tmp_path):
    """Aggressive Mode PSK (identity in the clear, AM3 after floating) and a Quick Mode
    with PFS (a second Diffie-Hellman, ecp256)."""
    t = ra_topo
    g = gateway(t, tmp_path, psk_policy(id='"r1.example"'))
    c = client(t, t.r1, tmp_path, "r1", aggressive=True, proposals="aes128-sha256-ecp256",
               esp_proposals="aes128-sha256-ecp256")
    out = up(c)
    assert "Aggressive Mode" in out
    (isa,) = ike_sas(g)
    assert isa["peer id"] == "r1.example"
    # strongSwan hashes AM3's own (floated, port 4500) addresses: only the client is behind
    # a NAT, we are not (RFC 3947 §3.2) -- no "+local", no keepalives from us
    assert isa["nat"] == "peer", isa
    assert not any(p["keepalive"] in (True, "yes", "True") for p in g.rows("list", "esp.peer"))
    (cchild,) = c.list_sas()[0].children
    assert cchild.dh_group == "ECP_256", cchild
    assert ping(t.r1, t.h_addr)
    c.stop()
    g.terminate()


def test_mode_config_push_and_operator_delete(need_strongswan, ra_topo, tmp_path):
    """Push style (we send CFG_SET after XAUTH), then `narctl ike delete`: Delete payloads
    reach the client, which drops the SAs too."""
    t = ra_topo
    g = gateway(t, tmp_path, psk_policy(xauth="true", pool='"ra"', modecfg_push="true"), users=True)
    c = Charon(t.r1, tmp_path / "r1").start()
    conf = ikev1_client_conf(t.g_public, PSK, local_id="r1.example", xauth_user="alice", xauth_password="alice-pw")
    c.load(conf.replace("    version = 1\n", "    version = 1\n    pull = no\n"))
    up(c)
    (vip,) = c.list_sas()[0].local_vips
    assert vip.startswith("10.8.0.")
    assert "parsed TRANSACTION request" in c.log_text() and "CPS(ADDR" in c.log_text()
    assert ping(t.r1, t.h_addr)
    (isa,) = ike_sas(g)
    g.narctl("ike", "delete", isa["name"])
    wait_for(lambda: not [s for s in c.list_sas() if s.established], 10, "the client to drop its SAs")
    assert not ike_sas(g) and not esp_sas(g)
    assert "received DELETE for" in c.log_text()
    c.stop()
    g.terminate()


def test_reauthentication_keeps_the_address(need_strongswan, ra_topo, tmp_path):
    """strongSwan re-authenticates IKEv1 SAs (a new Main Mode, XAUTH, mode-config): the
    same user gets the same pool address back and traffic keeps flowing."""
    t = ra_topo
    g = gateway(t, tmp_path, psk_policy(xauth="true", pool='"ra"'), users=True)
    c = Charon(t.r1, tmp_path / "r1").start()
    conf = ikev1_client_conf(t.g_public, PSK, local_id="r1.example", xauth_user="alice", xauth_password="alice-pw")
    c.load(conf.replace("    version = 1\n", "    version = 1\n    rekey_time = 6s\n    rand_time = 0s\n"))
    up(c)
    (vip,) = c.list_sas()[0].local_vips
    first = {r["name"] for r in ike_sas(g)}
    wait_for(lambda: {r["name"] for r in ike_sas(g)} - first, 30, "a second ISAKMP SA")
    time.sleep(2)
    assert ping(t.r1, t.h_addr)
    rows = ike_sas(g)
    assert {r["address"] for r in rows if r["address"] != "-"} == {vip}
    c.stop()
    g.terminate()


def test_reconnect_after_a_reauthentication(need_strongswan, ra_topo, tmp_path):
    """strongSwan re-authenticates the ISAKMP SA (the old one is deleted, its CHILD_SA moves
    to the new one), the user disconnects and connects again within the 60 s orphan grace:
    the new connection gets an address and its Quick Mode is accepted.  (This order of
    events passed before the fix too; the engine-level
    test_reconnect_after_a_reauthentication_gets_a_working_address has the one that failed.)"""
    t = ra_topo
    g = gateway(t, tmp_path, psk_policy(xauth="true", pool='"ra"'), users=True)
    c = Charon(t.r1, tmp_path / "r1").start()
    conf = ikev1_client_conf(t.g_public, PSK, local_id="r1.example", xauth_user="alice", xauth_password="alice-pw")
    c.load(conf.replace("    version = 1\n", "    version = 1\n    rekey_time = 8s\n    rand_time = 0s\n"))
    up(c)
    first = {r["name"] for r in ike_sas(g)}
    # the scheduled re-authentication: a new ISAKMP SA, then a Delete of the old one only
    wait_for(lambda: {r["name"] for r in ike_sas(g)} and not first & {r["name"] for r in ike_sas(g)}, 30,
             "the re-authenticated ISAKMP SA to replace the first")
    assert ping(t.r1, t.h_addr)
    for _ in c.list_sas():
        c.terminate(ike="home")
    try:
        wait_for(lambda: not ike_sas(g) and not esp_sas(g), 15, "the gateway to clear the SAs")
    except AssertionError:
        raise AssertionError(f"{ike_sas(g)}\n{esp_sas(g)}\n{c.list_sas_text()}\n{c.log_text()[-3000:]}") from None
    up(c)
    (vip,) = c.list_sas()[0].local_vips
    assert ping(t.r1, t.h_addr)
    (isa,) = ike_sas(g)
    assert isa["address"] == vip, isa
    c.stop()
    g.terminate()


# ------------------------------------------------------------------------ fail closed, NAPT
def test_a_client_behind_a_nat_claims_its_private_address_only_with_a_policy(need_strongswan, ra_topo, tmp_path):
    """004 §7: a policy without pool, remote_ts or opt-in refuses R1's Quick Mode for its
    private /32; ``napt = true`` (001 Appendix A) lets it in, its packets reaching H from G_i."""
    t = ra_topo
    g = gateway(t, tmp_path, psk_policy(trust_client_address="false"))
    c = client(t, t.r1, tmp_path, "r1")
    res = c.initiate(child="net", timeout=25)
    assert not res.ok, res.output[-2000:]
    assert "INVALID_ID_INFORMATION" in res.output + c.log_text(), res.output[-2000:]
    stats = {r["counter"]: int(r["value"]) for r in g.rows("ike", "stats")}
    assert not esp_sas(g) and stats.get("ts_refused", 0) >= 1, stats
    c.stop()
    g.terminate()

    g = gateway(t, tmp_path, psk_policy(trust_client_address="false", napt="true"),
                esp_extra='napt_address = "10.9.0.1"\n')
    c = client(t, t.r1, tmp_path, "r1b")
    up(c)
    assert ping(t.r1, t.h_addr)
    napt = g.rows("list", "esp.napt")
    assert napt and all(r["inner_ip"] == t.r1_addr for r in napt), napt
    (peer,) = g.rows("list", "esp.peer")
    assert peer["policy"] == "napt", peer
    c.stop()
    g.terminate()


# ------------------------------------------------------------------------------ NAT rebinding
def test_a_nat_rebinding_while_traffic_flows_keeps_the_tunnel(need_strongswan, ra_topo, tmp_path):
    """NAT1 rebinds R1 to a new public port while R1 pings H.  The esp role follows the
    authenticated ESP; the ISAKMP SA must follow too (RFC 3947 §7) and ESP counts as
    liveness: past several DPD timeouts the tunnel is still there, the ISAKMP SA at the new
    mapping, and once traffic stops our DPD probes reach R1 there and are answered."""
    t = ra_topo
    g = gateway(t, tmp_path, psk_policy(), ike_extra="dpd_delay = 2\ndpd_timeout = 5\n")
    c = client(t, t.r1, tmp_path, "r1")
    up(c)
    assert ping(t.r1, t.h_addr)
    (isa,) = ike_sas(g)
    assert isa["remote"] == f"{t.nat1_public}:4500", isa
    flow = t.r1.popen(["ping", "-i", "0.2", "-w", "30", "-q", t.h_addr],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        # the rebinding: NAT1 maps to other ports from now on and forgets its mappings
        t.nat1.nft('flush chain ip nat postrouting\n'
                   'add rule ip nat postrouting oifname "wan0" meta l4proto udp masquerade to :34500-34510\n'
                   'add rule ip nat postrouting oifname "wan0" masquerade\n')
        t.nat1.run(["conntrack", "-F"], check=False)
        moved = wait_for(lambda: [r for r in ike_sas(g) if not r["remote"].endswith(":4500")], 10,
                         "the ISAKMP SA to follow the new mapping")
        (isa,) = moved
        assert isa["remote"].startswith(f"{t.nat1_public}:345"), isa
        peers = g.rows("esp", "peers")
        assert [p["remote"] for p in peers] == [isa["remote"]], peers
        time.sleep(12)  # more than two DPD timeouts with traffic flowing
        (isa,) = ike_sas(g)
        assert isa["state"] == "established" and isa["children"] == 1, isa
    finally:
        t.r1.stop(flow)
    stats = {r["counter"]: int(r["value"]) for r in g.rows("ike", "stats")}
    assert stats.get("dpd_dead", 0) == 0 and stats.get("peer_moved", 0) >= 1, stats
    # idle now: DPD probes go to the new mapping and R1 answers them
    time.sleep(10)
    stats = {r["counter"]: int(r["value"]) for r in g.rows("ike", "stats")}
    assert stats.get("dpd_sent", 0) >= 1 and stats.get("dpd_dead", 0) == 0, stats
    assert len(ike_sas(g)) == 1 and ping(t.r1, t.h_addr)
    c.stop()
    g.terminate()


# ------------------------------------------------------------------------- troubleshooting
def test_what_strongswan_shows_for_an_unknown_identity(need_strongswan, ra_topo, tmp_path):
    """docs/roles/ike.md's troubleshooting table says what a client with an identity no
    policy names sees; this is where that sentence comes from."""
    t = ra_topo
    g = gateway(t, tmp_path, psk_policy(id='"r1.example"'))
    c = client(t, t.r1, tmp_path, "stranger")  # local_id stranger.example
    res = c.initiate(child="net", timeout=12)
    assert not res.ok
    shown = res.output + c.log_text()
    # our answer is an unprotected INVALID-ID-INFORMATION to the MM5 that was encrypted
    # already; strongSwan 5.9 does not accept it and retransmits MM5 until it gives up
    assert "message verification failed" in shown, shown[-3000:]
    assert "INFORMATIONAL_V1 request with message ID 0 processing failed" in shown
    assert "no policy with this PSK for 'stranger.example'" in g.log_text()
    stats = {r["counter"]: int(r["value"]) for r in g.rows("ike", "stats")}
    assert stats.get("no_policy", 0) >= 1, stats
    c.stop()
    g.terminate()
