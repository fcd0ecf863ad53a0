"""TCP and UDP mappings in NAR mode (SOCKS BIND / UDP ASSOCIATE after NAR-MODE).

Pure parts (nftables script text) run anywhere; the lab tests run the real daemon on N
(X 10.0.0.10 -- N 10.0.0.1/192.0.2.1=Nb -- Y 192.0.2.10), narsuite-nar-client on X, real
sockets on X and Y, and read N's ruleset with ``nft list``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from narsuite.nar import nft
from narsuite.nar.records import NarMapping

NB, XA, YB = "192.0.2.1", "10.0.0.10", "192.0.2.10"


def _m(kind, port, translated, remote_port=0):
    return NarMapping(id="s/1", session="s", kind=kind, proto=6 if kind == "tcp" else 17,
                      client=XA, lent=NB, remote=YB, translated=translated, port=port,
                      remote_port=remote_port)


# ------------------------------------------------------------------------------ pure

def test_elements_translated_and_end_to_end():
    assert nft.mapping_elements(_m("tcp", 20001, True)) == [
        ("tcp_any", f"{NB} . 20001 . {YB}", XA), ("snat_out", f"{XA} . tcp . 20001 . {YB}", NB)]
    assert nft.mapping_elements(_m("tcp", 20001, False, 5555)) == [
        ("tcp_peer", f"{NB} . 20001 . {YB} . 5555", nft.E2E_ADDRESS),
        ("snat_out", f"{nft.E2E_ADDRESS} . tcp . 20001 . {YB}", NB)]
    assert nft.mapping_elements(_m("udp", 5353, False), "169.254.9.9") == [
        ("udp_any", f"{NB} . 5353", "169.254.9.9"),
        ("snat_out", f"169.254.9.9 . udp . 5353 . {YB}", NB)]
    with pytest.raises(ValueError):
        nft.mapping_elements(NarMapping(id="i", session="s", kind="tcp", proto=17, client=XA,
                                        lent=NB, remote=YB))


def test_elements_of_icmp_esp_and_tunnel_mappings():
    """Issue 12: translated sessions were one-way, and N answered echo requests for mapped
    identifiers itself.  ICMP mappings take Y's echo requests away from N's stack (DNAT to
    Xa / the end-to-end TUN) and SNAT a translated client's own; translated ESP and
    tunnels from Xa get source Nb; end-to-end ones and AH need nothing in the kernel."""
    def m(kind, proto, translated, **kw):
        return NarMapping(id="i", session="s", kind=kind, proto=proto, client=XA, lent=NB,
                          remote=YB, translated=translated, **kw)

    assert nft.mapping_elements(m("icmp", 1, True, icmp_id=4242)) == [
        ("icmp_in", f"{NB} . {YB} . 4242", XA), ("icmp_out", f"{XA} . {YB} . 4242", NB)]
    assert nft.mapping_elements(m("icmp", 1, False, icmp_id=7)) == [
        ("icmp_in", f"{NB} . {YB} . 7", nft.E2E_ADDRESS)]
    assert nft.mapping_elements(m("ipsec", 50, True, spi=300)) == [
        ("xlate_out", f"{XA} . {YB} . 50", NB)]
    assert nft.mapping_elements(m("tunnel", 47, True, inner="10.2.0.1")) == [
        ("xlate_out", f"{XA} . {YB} . 47", NB)]
    for kind, proto in (("ipsec", 50), ("ipsec", 51), ("tunnel", 4)):
        assert nft.mapping_elements(m(kind, proto, False)) == []
    assert nft.conntrack_commands(m("icmp", 1, True)) == []
    script = nft.table_script("narnat0")
    for line in ("icmp type echo-request dnat ip to ip daddr . ip saddr . icmp id map @icmp_in",
                 "icmp type echo-request snat ip to ip saddr . ip daddr . icmp id map @icmp_out",
                 "ip saddr set ip saddr . ip daddr . meta l4proto map @xlate_out"):
        assert line in script


def test_add_and_delete_scripts_name_the_same_keys():
    el = nft.mapping_elements(_m("udp", 20002, True))
    add = nft.elements_script("add", el)
    delete = nft.elements_script("delete", el)
    assert add == (f"add element ip narsuite_nar udp_any {{ {NB} . 20002 : {XA} }}\n"
                   f"add element ip narsuite_nar snat_out {{ {XA} . udp . 20002 . {YB} : {NB} }}\n")
    assert delete == (f"delete element ip narsuite_nar udp_any {{ {NB} . 20002 }}\n"
                      f"delete element ip narsuite_nar snat_out {{ {XA} . udp . 20002 . {YB} }}\n")


def test_table_script_replaces_leftovers_and_clamps_on_the_tun():
    text = nft.table_script("narnat0")
    assert text.startswith("add table ip narsuite_nar\ndelete table ip narsuite_nar\n")
    assert "type nat hook prerouting priority dstnat" in text
    assert "dnat ip to ip daddr . tcp dport . ip saddr . tcp sport map @tcp_peer" in text
    assert f'oifname "narnat0" tcp flags syn tcp option maxseg size > {nft.MSS}' in text
    assert "forward_mss" not in nft.table_script(None)
    assert nft.delete_table_script() == "add table ip narsuite_nar\ndelete table ip narsuite_nar\n"


def test_port_reservations():
    bound = {}

    def bind(proto, port):
        if port == 22:
            raise OSError(98, "Address already in use")
        bound[(proto, port)] = True
        return object()

    r = nft.PortReservations(NB, bind)
    assert r.reserve(6, 20000) and not r.reserve(6, 20000)  # ours already
    assert r.reserve(17, 20000)  # another protocol
    assert not r.reserve(6, 22)  # used on N
    assert r.held() == {(6, 20000), (17, 20000)}
    r.release(6, 20000)
    assert r.reserve(6, 20000)
    r.release_all()
    assert r.held() == set()


def test_real_reservation_refuses_a_port_in_use():
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    r = nft.PortReservations("127.0.0.1")
    assert not r.reserve(17, port)
    s.close()
    assert r.reserve(17, port)
    r.release_all()


# ------------------------------------------------------------------------------- lab

PEER = textwrap.dedent("""
    import json, socket, sys, threading, time
    cmd = sys.argv[1]
    if cmd == "tcp-echo":            # addr port seconds: echo every connection, report peers
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((sys.argv[2], int(sys.argv[3]))); s.listen(8); s.settimeout(float(sys.argv[4]))
        print("READY", flush=True)
        try:
            while True:
                c, peer = s.accept()
                print(json.dumps({"peer": list(peer), "local": list(c.getsockname())}), flush=True)
                while True:
                    b = c.recv(65536)
                    if not b:
                        break
                    c.sendall(b)
                c.close()
        except socket.timeout:
            pass
    elif cmd == "udp-echo":          # addr port seconds: answer every datagram, report peers
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((sys.argv[2], int(sys.argv[3]))); s.settimeout(float(sys.argv[4]))
        print("READY", flush=True)
        try:
            while True:
                b, peer = s.recvfrom(65536)
                s.sendto(b + b" from " + f"{peer[0]}:{peer[1]}".encode(), peer)
                print(json.dumps({"peer": list(peer)}), flush=True)
        except socket.timeout:
            pass
    elif cmd == "tcp-call":          # host port nbytes
        data = bytes(range(256)) * (int(sys.argv[4]) // 256)
        try:
            c = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=5)
            got = bytearray()
            def send():
                c.sendall(data)
            t = threading.Thread(target=send); t.start()
            while len(got) < len(data):
                b = c.recv(65536)
                if not b:
                    break
                got += b
            t.join(); c.close()
            print(json.dumps({"ok": bytes(got) == data, "n": len(got)}))
        except OSError as e:
            print(json.dumps({"error": type(e).__name__}))
    elif cmd == "udp-call":          # bind_addr bind_port host port
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((sys.argv[2], int(sys.argv[3]))); s.settimeout(2)
        for _ in range(3):
            s.sendto(b"hello", (sys.argv[4], int(sys.argv[5])))
            try:
                b, peer = s.recvfrom(65536)
                print(json.dumps({"reply": b.decode(), "peer": list(peer)})); break
            except socket.timeout:
                continue
        else:
            print(json.dumps({"error": "timeout"}))
""")


def _peer(tmp):
    path = tmp / "peer.py"
    path.write_text(PEER)
    return str(path)


def _server(host, script, *args):
    proc = host.popen([sys.executable, script, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY"
    return proc


def _call(host, script, *args):
    out = host.run([sys.executable, script, *args], timeout=60).stdout
    return json.loads(out.strip().splitlines()[-1])


def _reports(host, proc):
    host.stop(proc)
    out, _ = proc.communicate(timeout=10)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _ruleset(t):
    return t.n.run(["nft", "list", "ruleset"]).stdout


@pytest.mark.parametrize("translated", [True, False], ids=["translated", "end-to-end"])
def test_tcp_and_udp_mappings(nar_topo, tmp_path, translated):
    from test_nar_role import Client, start_n

    t = nar_topo
    script = _peer(tmp_path)
    n = start_n(t, tmp_path)
    c = Client(t, "--bind-tcp", "0", "--udp", "0", "--udp", "21234",
               *(["--translated"] if translated else ["--tun"]))
    assert c.result["translated"] is translated and c.result["lent"] == t.n_public
    (ptcp,), (pudp, pudp2) = c.result["tcp"], c.result["udp"]
    assert 20000 <= ptcp <= 32767 and 20000 <= pudp <= 32767 and pudp2 == 21234
    rows = {(m["kind"], m["tuple"]) for m in n.rows("nar", "mappings")}
    assert rows == {("tcp", f"port {ptcp}"), ("udp", f"port {pudp}"), ("udp", "port 21234")}
    rules = _ruleset(t)
    target = t.x_addr if translated else nft.E2E_ADDRESS
    assert f"{t.n_public} . {ptcp} . {t.y_addr} : {target}" in rules, rules
    assert f"{t.n_public} . {pudp} : {target}" in rules, rules

    # servers on X: translated -> the wildcard (N DNATs to Xa); end-to-end -> Nb:P for TCP
    tcp_addr = "0.0.0.0" if translated else t.n_public
    tsrv = _server(t.x, script, "tcp-echo", tcp_addr, str(ptcp), "20")
    usrv = _server(t.x, script, "udp-echo", "0.0.0.0", str(pudp), "20")
    # Y connects to Nb:P; 256 KiB both ways (end-to-end: the MSS clamp keeps segments
    # small enough for the IP-in-IP delivery)
    got = _call(t.y, script, "tcp-call", t.n_public, str(ptcp), str(256 * 1024))
    assert got == {"ok": True, "n": 256 * 1024}, got
    got = _call(t.y, script, "udp-call", t.y_addr, "40001", t.n_public, str(pudp))
    assert got.get("reply") == f"hello from {t.y_addr}:40001", got
    assert got["peer"] == [t.n_public, pudp]  # the answer comes from Nb:P
    # 2.6.1 lists Y's source port in the UDP tuple; ours is (Nb, P) (nar-protocol.md, "Why
    # (Nb, P)"): a datagram from another Y port reaches the same mapping
    got = _call(t.y, script, "udp-call", t.y_addr, "40002", t.n_public, str(pudp))
    assert got.get("reply") == f"hello from {t.y_addr}:40002", got
    peers = _reports(t.x, tsrv)
    assert peers and peers[0]["peer"][0] == t.y_addr  # X sees Y's real address
    assert peers[0]["local"] == [t.x_addr if translated else t.n_public, ptcp]
    assert [r["peer"] for r in _reports(t.x, usrv)] == [[t.y_addr, 40001], [t.y_addr, 40002]]

    # a flow X starts from Nb:P (UDP), answered by Y: Y sees Nb:P as the source
    ysrv = _server(t.y, script, "udp-echo", t.y_addr, "7000", "20")
    x_bind = "0.0.0.0" if translated else t.n_public
    got = _call(t.x, script, "udp-call", x_bind, "21234", t.y_addr, "7000")
    assert got.get("reply") == f"hello from {t.n_public}:21234", got
    t.y.stop(ysrv)

    stats = {r["counter"]: r["value"] for r in n.rows("nar", "stats")}
    if not translated:
        assert stats["dataplane.in_tcp"] > 0 and stats["dataplane.in_udp"] > 0
        assert stats["dataplane.out_tcpudp"] > 0
    assert stats["dataplane.tcpudp_installed"] == 3

    # the client goes: mappings, elements and reservations go with it
    c.stop()
    deadline = time.monotonic() + 2.0
    while n.rows("nar", "mappings") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert n.rows("nar", "mappings") == []
    deadline = time.monotonic() + 2.0
    while str(ptcp) in _ruleset(t) and time.monotonic() < deadline:
        time.sleep(0.05)
    rules = _ruleset(t)
    assert "table ip narsuite_nar" in rules  # the table stays while the daemon runs
    for p in (ptcp, pudp, 21234):
        assert f" {p} " not in rules, rules
    tsrv = _server(t.x, script, "tcp-echo", "0.0.0.0", str(ptcp), "5")
    usrv = _server(t.x, script, "udp-echo", "0.0.0.0", str(pudp), "10")
    got = _call(t.y, script, "tcp-call", t.n_public, str(ptcp), "256")
    assert "error" in got, got  # N's own kernel answers now (RST): nothing reaches X
    # the UDP flow Y used before (same ports): its conntrack entry went with the mapping
    got = _call(t.y, script, "udp-call", t.y_addr, "40001", t.n_public, str(pudp))
    assert got == {"error": "timeout"}, got
    assert _reports(t.x, tsrv) == [] and _reports(t.x, usrv) == []
    n.terminate()
    assert "narsuite_nar" not in _ruleset(t)  # the table went with the daemon


def test_bind_refusals_in_the_lab(nar_topo, tmp_path):
    """A UDP port used by a program on N is not lent: the client gets another one."""
    from test_nar_role import Client, start_n

    t = nar_topo
    script = _peer(tmp_path)
    busy = _server(t.n, script, "udp-echo", t.n_public, "21500", "20")
    n = start_n(t, tmp_path)
    c = Client(t, "--udp", "21500", "--translated")
    assert c.result["udp"][0] != 21500
    stats = {r["counter"]: r["value"] for r in n.rows("nar", "stats")}
    assert stats["nar.port_in_use_on_n"] == 1
    c.stop()
    t.n.stop(busy)
    n.terminate()


def test_conntrack_commands():
    assert nft.conntrack_commands(_m("udp", 20003, True)) == [
        ["-D", "-p", "udp", "--orig-dst", NB, "--orig-port-dst", "20003"],
        ["-D", "-p", "udp", "--reply-dst", NB, "--reply-port-dst", "20003"]]
