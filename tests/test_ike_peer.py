"""tests/ike_peer.py, the independent IKEv1 initiator, against a real strongSwan responder.

Why: the ike role's tests and the IKE benchmark will trust this initiator, so it must first
complete Main Mode + Quick Mode with charon (our peer on R1 behind NAT1, charon on G), and
its derived ESP keys must be the responder's: charon's ``list_sas`` shows the SPIs we
derived, and one ICMP echo sealed with our outbound keys reaches H and the reply opens with
our inbound keys (ESP done by charon's kernel-libipsec, not by narsuite).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from narsuite.ike import constants as C
from narsuite.ike import isakmp as M
from narsuite.lab.pytest_plugin import unavailable
from narsuite.lab.strongswan import Charon, ikev1_gateway_conf, strongswan_unavailable_reason

PEER = Path(__file__).resolve().with_name("ike_peer.py")
_spec = importlib.util.spec_from_file_location("ike_peer_under_test", PEER)
ike_peer = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ike_peer  # attrs needs the module registered for its classes
_spec.loader.exec_module(ike_peer)

PSK = "peer-test-psk"
GW_ESP = "aes128-sha1,aes128gcm16,aes256gcm16,aes256-sha256,aes128-sha1-modp2048,aes256gcm16-ecp256"

PHASE1 = {
    "aes128-sha1-modp2048": ["--cipher-bits", "128", "--hash", "sha1", "--group", "14"],
    "aes256-sha256-ecp256": ["--cipher-bits", "256", "--hash", "sha256", "--group", "19"],
    "aes128-sha1-ecp256": ["--cipher-bits", "128", "--hash", "sha1", "--group", "19"],
    "aes256-sha256-modp2048": ["--cipher-bits", "256", "--hash", "sha256", "--group", "14"],
}
PHASE2 = {
    "aes128-sha1": (["--esp", "aes-cbc", "--esp-bits", "128", "--integ", "hmac-sha1-96"], "AES_CBC-128", ""),
    "aes256-sha256": (["--esp", "aes-cbc", "--esp-bits", "256", "--integ", "hmac-sha256-128"], "AES_CBC-256", ""),
    "aes128gcm16": (["--esp", "aes-gcm-16", "--esp-bits", "128", "--integ", "none"], "AES_GCM_16-128", ""),
    "aes128-sha1-pfs14": (["--esp", "aes-cbc", "--integ", "hmac-sha1-96", "--pfs", "14"], "AES_CBC-128",
                          "MODP_2048"),
    "aes256gcm16-pfs19": (["--esp", "aes-gcm-16", "--esp-bits", "256", "--integ", "none", "--pfs", "19"],
                          "AES_GCM_16-256", "ECP_256"),
}


@pytest.fixture
def gateway(ra_topo, tmp_path):
    reason = strongswan_unavailable_reason()
    if reason:
        unavailable(reason, "strongSwan")
    gw = Charon(ra_topo.g, tmp_path / "g").start()
    gw.load(ikev1_gateway_conf(ra_topo.g_public, PSK, remote_ts=ra_topo.private_net, esp_proposals=GW_ESP))
    return gw


def run_peer(topo, *args: str) -> tuple[int, dict]:
    proc = topo.r1.run([sys.executable, str(PEER), "--target", topo.g_public, *args], check=False, timeout=60)
    assert proc.stdout.strip(), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_first_message_offers_one_transform_and_natt():
    config = ike_peer.PeerConfig(psk=b"x", phase1=ike_peer.Phase1(key_bits=256, hash="sha256", group=19))
    ini = ike_peer.Initiator(config, ("192.168.1.10", 500), "198.51.100.1")
    out = ini.start()
    assert out.port == 500
    msg = M.parse_message(out.data)
    assert msg.header.exchange == C.EXCH_MAIN and msg.header.rcookie == bytes(8)
    sa = M.find(msg.payloads, M.SecurityAssociation)
    (prop,) = sa.proposals
    (tr,) = prop.transforms
    assert tr.get(C.P1_ENCRYPTION).int_value == C.ENC_AES_CBC and tr.get(C.P1_KEY_LENGTH).int_value == 256
    assert tr.get(C.P1_HASH).int_value == C.HASH_SHA2_256 and tr.get(C.P1_GROUP_DESC).int_value == 19
    assert tr.get(C.P1_AUTH_METHOD).int_value == C.AUTH_PSK
    assert C.VID_NATT_RFC3947 in {v.data for v in M.find_all(msg.payloads, M.VendorID)}
    # unrelated datagrams are ignored, not fatal
    assert ini.receive(b"junk" * 10, 500) is None
    assert ini.receive(out.data, 500) is None  # our own message: no SA answer from a responder


def test_esp_seal_open_round_trip():
    for enc, integ, klen, ilen in (("aes-cbc-128", "hmac-sha1-96", 16, 20), ("aes-cbc-256", "hmac-sha256-128", 32, 32),
                                   ("aes-gcm-16-128", None, 20, 0)):
        sa = ike_peer.EspSA(0x1234, enc, bytes(range(klen)), integ, bytes(range(ilen)))
        inner = ike_peer._icmp_echo("192.168.1.10", "10.1.0.10", 7)
        assert ike_peer.esp_open(sa, ike_peer.esp_seal(sa, 1, inner)) == inner
        broken = bytearray(ike_peer.esp_seal(sa, 1, inner))
        broken[-1] ^= 1
        with pytest.raises(ike_peer.PeerError):
            ike_peer.esp_open(sa, bytes(broken))


@pytest.mark.parametrize("p1", sorted(PHASE1))
def test_main_and_quick_mode_with_strongswan(ra_topo, gateway, p1):
    code, out = run_peer(ra_topo, "--psk", PSK, "--id", "r1.example", "--ping", ra_topo.h_addr, *PHASE1[p1])
    assert code == 0 and out["ok"], (out, gateway.log_text()[-3000:])
    assert out["floated"] and out["nat_local"] and out["encap_mode"] == C.ENCAP_UDP_TUNNEL
    assert out["ping"] is True

    sa = gateway.wait_sa()
    assert sa.version == 1 and not sa.initiator
    assert (sa.spi_i.hex(), sa.spi_r.hex()) == (out["icookie"], out["rcookie"])
    assert sa.remote_host == ra_topo.nat1_public and sa.remote_port != 500 and sa.local_port == 4500
    assert sa.remote_id == "r1.example" and sa.nat_remote
    expected = {"aes128-sha1-modp2048": ("AES_CBC-128", "MODP_2048"),
                "aes256-sha256-ecp256": ("AES_CBC-256", "ECP_256"),
                "aes128-sha1-ecp256": ("AES_CBC-128", "ECP_256"),
                "aes256-sha256-modp2048": ("AES_CBC-256", "MODP_2048")}[p1]
    assert (sa.encr, sa.dh_group) == expected
    (child,) = sa.children
    # charon's inbound SA is our outbound one and vice versa
    assert f"{child.spi_in:08x}" == out["outbound"]["spi"] and f"{child.spi_out:08x}" == out["inbound"]["spi"]
    assert child.encap and child.mode == "TUNNEL" and child.state == "INSTALLED"
    assert child.packets_in >= 1 and child.packets_out >= 1


@pytest.mark.parametrize("p2", sorted(PHASE2))
def test_quick_mode_transforms_and_pfs(ra_topo, gateway, p2):
    args, encr, pfs = PHASE2[p2]
    code, out = run_peer(ra_topo, "--psk", PSK, "--ping", ra_topo.h_addr, *args)
    assert code == 0 and out["ping"] is True, (out, gateway.log_text()[-3000:])
    (child,) = gateway.wait_sa().children
    assert child.encr == encr and child.dh_group == pfs
    assert f"{child.spi_in:08x}" == out["outbound"]["spi"]


def test_wrong_psk_fails(ra_topo, gateway):
    code, out = run_peer(ra_topo, "--psk", "not-the-psk", "--timeout", "4")
    assert code == 1 and not out["ok"]
    assert not any(sa.established for sa in gateway.list_sas())


def test_force_nat_without_nat(ra_topo, gateway):
    """Without a NAT (NAT1's public address talks to G directly) --force-nat still floats."""
    t = ra_topo
    proc = t.nat1.run([sys.executable, str(PEER), "--target", t.g_public, "--psk", PSK, "--force-nat",
                       "--local-ts", "192.168.1.0/24", "--ping", t.h_addr], check=False, timeout=60)
    out = json.loads(proc.stdout)
    assert out["ok"] and out["floated"] and out["ping"], (out, proc.stderr)
    sa = gateway.wait_sa()
    assert sa.remote_host == t.nat1_public
