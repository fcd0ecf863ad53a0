"""Case (d) of issue 13 with a real client: the nar role on the shared store (a real redis-server
on N's loopback) while Redis goes away.  An existing ICMP mapping keeps forwarding (ping from the
borrowed address through N), a new ICMP-ASSOCIATE is refused with SOCKS general failure (0x01) and
counted as store_unavailable, and once Redis is back the same request succeeds without a restart.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from test_nar_role import PASSWORD, PINGER, Client, start_n

from narsuite.lab import pytest_plugin
from narsuite.lab.redis import RedisServer


def nar_client(t, *args: str) -> dict:  # type: ignore[no-untyped-def]
    """One run of narsuite-nar-client on X: its first JSON line (a result or {"error": ...})."""
    proc = t.x.popen(["narsuite-nar-client", "--server", t.n_private, "--remote", t.y_addr,
                      "--user", "alice", "--password", PASSWORD, *args],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        return json.loads(line)
    finally:
        t.x.stop(proc)


def stats(n) -> dict:  # type: ignore[no-untyped-def]
    return {r["counter"]: r["value"] for r in n.rows("nar", "stats")}


def test_d_redis_down_forwarding_goes_on_new_mappings_refused_0x01_then_recovery(nar_topo, tmp_path):
    pytest_plugin.need_tools("redis-server")
    t = nar_topo
    db = RedisServer(6379, appendonly=True, prefix=["ip", "netns", "exec", t.n.netns]).start()
    try:
        n = start_n(t, tmp_path, backend="redis",
                    extra='[store.redis]\nurl = "redis://127.0.0.1:6379"\n[cluster]\nnode_id = "n1"\n')
        c = Client(t, "--icmp", "4242", "--tun")
        assert c.result["icmp"] == [4242]
        (tmp_path / "pinger.py").write_text(PINGER)

        def ping_ok() -> bool:
            out = t.x.run([sys.executable, str(tmp_path / "pinger.py"), t.n_public, t.y_addr, "4242"])
            return f"REPLY {t.y_addr} {t.n_public}" in out.stdout

        assert ping_ok()
        db.kill()  # kill -9: Redis is gone
        deadline = time.monotonic() + 10
        while n.json("cluster")["title"].find("UNREACHABLE") < 0:
            assert time.monotonic() < deadline, n.json("cluster")
            time.sleep(0.1)
        assert ping_ok()  # the existing mapping keeps forwarding
        refused = nar_client(t, "--icmp", "4243")
        print("\nrefused while Redis is down:", refused)
        assert "error" in refused and "0x01" in refused["error"].lower() + json.dumps(refused), refused
        assert stats(n).get("nar.store_unavailable", 0) >= 1, (stats(n), refused)
        assert ping_ok()
        db.start()  # back (its append-only file kept the leases)
        deadline = time.monotonic() + 15
        while True:
            again = nar_client(t, "--icmp", "4243")
            if "error" not in again:
                break
            assert time.monotonic() < deadline, again
            time.sleep(0.3)
        assert again["icmp"] == [4243]
        assert ping_ok()
        c.stop()
        n.terminate()
    finally:
        db.close()
