"""IKEv2 in the ike role against a real strongSwan 5.9 client (``version = 2``), in the
remote-access lab: R1 and R3 behind NAT1 (nftables masquerade), narsuite ``--role=ike,esp``
on G, H the internal host.  Each test names the issue's proof case it covers; traffic
goes through the tunnel for real and tshark reads every capture.
"""

from __future__ import annotations

from pathlib import Path

from labtraffic import ping, tcp_transfer
from test_ike_lab import TRANSFER, Capture, gateway

from narsuite.lab.daemon import NarsuiteDaemon
from narsuite.lab.strongswan import Charon, ikev2_client_conf

PSK = "lab-psk-v2-0123456789"


def v2_policy(**extra: str) -> str:
    lines = {"name": '"rw2"', "versions": "[2]", "psk": f'"{PSK}"', "local_id": '"gw.example"',
             "local_ts": '["10.1.0.0/24"]', "pool": '"ra"', "dns": '["10.1.0.53"]'}
    lines.update(extra)
    return "[[ike.peers]]\n" + "".join(f"{k} = {v}\n" for k, v in lines.items())


def client(t, host, tmp: Path, name: str, extra_conf: str = "", **conf) -> Charon:
    c = Charon(host, tmp / name, extra_conf=extra_conf).start()
    conf.setdefault("local_id", f"{name}.example")
    c.load(ikev2_client_conf(t.g_public, PSK, **conf))
    return c


def up(c: Charon, child: str = "net") -> str:
    res = c.initiate(child=child, timeout=25)
    assert res.ok, res.output[-3000:] + c.log_text()[-3000:]
    return res.output


def ike_sas(g: NarsuiteDaemon) -> list[dict]:
    return g.rows("ike", "sas")


def esp_sas(g: NarsuiteDaemon) -> list[dict]:
    return g.rows("esp", "sas")


# ------------------------------------------------------------------------------------- (a)
def test_a_psk_virtual_ip_through_nat(need_strongswan, ra_topo, tmp_path):
    """(a) PSK, a virtual IP from the pool, NAT detected and floated to 4500, ping and a
    TCP transfer to H both ways; tshark reads every packet."""
    t = ra_topo
    g = gateway(t, tmp_path, v2_policy())
    cap = Capture(t.g, "wan0", tmp_path / "a.pcap")
    c = client(t, t.r1, tmp_path, "r1")
    out = up(c)
    assert "IKE_SA_INIT" in out and "IKE_AUTH" in out
    (csa,) = c.list_sas()
    assert csa.version == 2 and csa.established and csa.nat_local
    assert (csa.local_port, csa.remote_port) == (4500, 4500)
    (vip,) = csa.local_vips
    assert vip.startswith("10.8.0.")
    (cchild,) = csa.children
    assert cchild.encap and cchild.local_ts == (f"{vip}/32",) and cchild.remote_ts == ("10.1.0.0/24",)

    (isa,) = ike_sas(g)
    assert isa["remote"] == f"{t.nat1_public}:4500" and isa["state"] == "established"
    assert isa["peer id"] == "r1.example" and isa["address"] == vip and "peer" in isa["nat"]
    spis = {(r["dir"], int(r["spi"], 16)) for r in esp_sas(g)}
    assert spis == {("in", cchild.spi_out), ("out", cchild.spi_in)}

    assert ping(t.r1, t.h_addr)
    assert tcp_transfer(t.h, t.r1, t.h_addr, size=TRANSFER) == TRANSFER
    assert tcp_transfer(t.r1, t.h, vip, size=TRANSFER) == TRANSFER
    (cchild,) = c.list_sas()[0].children
    assert cchild.packets_in > 100 and cchild.packets_out > 100
    protocols = cap.check()
    assert any("isakmp" in p for p in protocols)
    assert any(p.endswith("udpencap:esp") for p in protocols)
    c.stop()
    g.terminate()
