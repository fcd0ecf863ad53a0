"""The nar role's shipped example (etc/nar.toml) and its guide agree with the code.

Issue 12: the example's rule passed ``connect``, ``udp`` and ``nar`` but not ``bind``, so
``narsuite-nar-client --bind-tcp`` failed with 0x02 against it while the guide said TCP/UDP
mappings were not checked against the rules; a second NAR-MODE got 0x07 where the guide says
0x01.  The example is run here as shipped (only its state directories are moved), in the
X—N—Y lab whose addresses it was written for.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from narsuite import config as cfgmod
from narsuite.lab.daemon import NarsuiteDaemon
from narsuite.nar import wire

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "etc" / "nar.toml"
PROTOCOL_GUIDE = ROOT / "docs" / "roles" / "nar-protocol.md"


def test_example_loads_and_its_rule_passes_every_nar_command():
    cfg = cfgmod.load(EXAMPLE).role("nar")
    from narsuite.nar.rules import RuleSet

    rules = RuleSet(cfg.rules, "debug")
    nb, yb, xa = cfg.nar.lent_address, "192.0.2.10", "10.0.0.10"
    for command in ("connect", "bind", "udp", "nar"):
        assert rules.check(xa, "alice", command, yb, 0 if command == "nar" else 7).allowed, command
    assert not rules.check(xa, "alice", "connect", "10.0.0.99", 22).allowed  # no pivoting back
    assert nb == "192.0.2.1" and cfg.listen == "10.0.0.1"


def test_guide_says_bind_and_udp_are_checked_and_second_nar_mode_is_0x01():
    text = PROTOCOL_GUIDE.read_text()
    assert "are not checked again" not in text
    row = next(ln for ln in text.splitlines() if "second NAR-MODE" in ln)
    assert "| 0x01 |" in row


def test_second_nar_mode_is_answered_0x01_and_the_session_stays():
    from test_nar_session import _socks_nar

    h, store, p, tr = _socks_nar()
    p.dataReceived(wire.encode_socks_request(0x80, 0, 1, "192.0.2.10", 0) + wire.encode_icmp(1, 9))
    out = tr.value()
    assert out[:2] == b"\x05\x01" and out[10:] == wire.encode_icmp(0, 9), out.hex()
    assert not tr.disconnecting


def test_shipped_example_in_the_lab(nar_topo, tmp_path):
    """twistd with etc/nar.toml as shipped; the client with the example's user and password
    gets every kind of mapping, TCP (BIND) included."""
    t = nar_topo
    text = EXAMPLE.read_text()
    text = re.sub(r'state_dir = ".*"', f'state_dir = "{tmp_path / "state"}"', text)
    text = re.sub(r'runtime_dir = ".*"', f'runtime_dir = "{tmp_path / "run"}"', text)
    assert text.count(str(tmp_path)) == 2
    cfg = tmp_path / "nar.toml"
    cfg.write_text(text)
    assert (t.n_private, t.n_public, t.y_addr) == ("10.0.0.1", "192.0.2.1", "192.0.2.10")
    n = NarsuiteDaemon(t.n, cfg, roles="nar").start()
    try:
        proc = t.x.popen(["narsuite-nar-client", "--server", t.n_private, "--remote", t.y_addr,
                          "--user", "alice", "--password", "change-me", "--icmp", "0",
                          "--ipsec", "esp", "--bind-tcp", "0", "--udp", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        result = json.loads(proc.stdout.readline() or '{"error": "no output"}')
        assert "error" not in result, (result, n.log.read_text()[-3000:])
        assert len(result["tcp"]) == 1 and len(result["udp"]) == 1 and len(result["icmp"]) == 1
        t.x.stop(proc)
    finally:
        n.terminate()
