"""The daemon in a network namespace: narctl, metrics, manhole, and the store
surviving a clean restart and a ``kill -9``."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import bcrypt
import pytest

from narsuite.lab.daemon import NarsuiteDaemon

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "run_twistd_demo.py"
PASSWORD = "integration secret"


def manhole(host, port: int, key: Path, lines: list[str]) -> str:
    """Type Python lines into the manhole over SSH (OpenSSH client), return the output."""
    cmd = ["ssh", "-F", "/dev/null", "-tt", "-p", str(port), "-i", str(key),
           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
           "-o", "GlobalKnownHostsFile=/dev/null", "-o", "IdentityAgent=none",
           "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
           "-o", "PreferredAuthentications=publickey", "admin@127.0.0.1"]
    typed = "".join(line + "\r" for line in lines).encode() + b"\x04"
    out = host.run(cmd, input=typed, timeout=30, check=False, text=False)
    assert out.returncode == 0, out
    return out.stdout.decode(errors="replace")


def leases(daemon: NarsuiteDaemon) -> dict[str, dict]:
    return {row["key"]: row for row in daemon.json("list", "store.lease")["rows"]}


def test_daemon_in_a_namespace(lab, tmp_path: Path) -> None:
    d = lab.host("d")
    c = lab.host("c")
    link = lab.link(d, c, "10.77.0.1/24", "10.77.0.2/24")
    key = tmp_path / "id_admin"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (tmp_path / "authorized_keys").write_text((tmp_path / "id_admin.pub").read_text())
    (tmp_path / "authorized_keys").chmod(0o600)
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    config = tmp_path / "narsuite.toml"
    config.write_text(textwrap.dedent(f"""
        [daemon]
        state_dir = "state"
        runtime_dir = "run"
        [store]
        flush_interval = 0.02
        [store.pools.ra]
        network = "10.8.0.0/24"
        exclude = ["10.8.0.1"]
        [metrics]
        listen = "127.0.0.1"
        port = 9470
        [manhole]
        enabled = true
        port = 2222
        authorized_keys = "authorized_keys"
        [manhole.users]
        admin = "{hashed}"
        [demo]
        greeting = "lab"
        """))
    daemon = NarsuiteDaemon(d, config, roles="demo", runner=RUNNER).start()

    # --- narctl
    status = daemon.json("status")["fields"]
    assert status["roles"] == "demo" and status["store_backend"] == "sqlite"
    assert status["metrics"] == "127.0.0.1:9470" and status["manhole"] == "127.0.0.1:2222"
    greeting = daemon.json("show", "demo.greeting", "boot")["fields"]
    assert greeting["text"] == "lab"
    spi = greeting["spi"]
    assert daemon.narctl("demo", "greetings").stdout.splitlines()[1].split() == ["boot", "lab"]
    assert oct((tmp_path / "run" / "control.sock").stat().st_mode & 0o777) == "0o600"

    # --- metrics: on the namespace's loopback, not on its veth
    body = d.run(["curl", "-sf", "http://127.0.0.1:9470/metrics"]).stdout
    assert 'narsuite_store_records{kind="demo.greeting"} 1.0' in body
    assert 'narsuite_store_pool_size{pool="ra"} 253.0' in body
    refused = c.run(["curl", "-s", "-m", "3", f"http://{link.a_ip}:9470/metrics"], check=False)
    assert refused.returncode != 0

    # --- manhole: read live state and change it
    out = manhole(d, 2222, key, [
        'print("GREETING", store.get("demo.greeting", "boot").spi)',
        'store.lease_address("ra", "peer-1", ttl=3600)',
        'store.claim("icmp-id", 4242, "peer-1", ttl=3600)',
        'store.claim("icmp-id", 999, "short-lived", ttl=2)',
        'print("POOL", store.pool_usage("ra"), sorted(daemon.role_names))',
    ])
    assert f"GREETING {spi}" in out
    assert "POOL (1, 253) ['demo']" in out
    held = leases(daemon)
    assert held["pool:ra/10.8.0.2"]["holder"] == "peer-1"
    assert "icmp-id/4242" in held and "icmp-id/999" in held
    assert daemon.json("pools")["rows"] == [{"pool": "ra", "network": "10.8.0.0/24", "leased": 1, "size": 253}]

    # --- a clean restart keeps every record
    daemon.terminate()
    daemon.start()
    assert daemon.json("show", "demo.greeting", "boot")["fields"]["spi"] == spi
    assert set(leases(daemon)) >= {"pool:ra/10.8.0.2", "icmp-id/4242", f"spi/{spi}"}

    # --- kill -9: acknowledged writes survive, expired ones do not come back
    manhole(d, 2222, key, ['store.claim("icmp-id", 5151, "peer-2", ttl=3600)'])
    time.sleep(0.3)  # > flush_interval: the claim is committed
    assert "icmp-id/5151" in leases(daemon)
    daemon.kill9()
    time.sleep(2.1)  # the 2 s lease lapses while the daemon is down
    daemon.start()  # the stale socket and its lock from the killed process do not stop it
    held = leases(daemon)
    assert {"pool:ra/10.8.0.2", "icmp-id/4242", "icmp-id/5151", f"spi/{spi}"} <= set(held)
    assert "icmp-id/999" not in held
    assert daemon.json("show", "demo.greeting", "boot")["fields"]["spi"] == spi
    # the pool allocator knows what is taken after the restart
    out = manhole(d, 2222, key, [
        'store.lease_address("ra", "peer-3")',
        'print("LEASES", sorted(str(a) for (n, a) in [k for k, *_ in store.items("store.lease")] '
        'if n == "pool:ra"))',
    ])
    assert "LEASES ['10.8.0.2', '10.8.0.3']" in out
    body = d.run(["curl", "-sf", "http://127.0.0.1:9470/metrics"]).stdout
    assert 'narsuite_store_pool_leased{pool="ra"} 2.0' in body
    daemon.terminate()


@pytest.mark.parametrize("flag", ["--role=mipproxy", "--role=demo,mipproxy"])
def test_mipproxy_without_addresses_refused_in_the_lab(lab, tmp_path: Path, flag: str) -> None:
    d = lab.host("d")
    config = tmp_path / "n.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path}/s"\nruntime_dir = "{tmp_path}/r"\n')
    out = d.run([sys.executable, str(RUNNER), "--config", str(config), flag], check=False)
    assert out.returncode != 0
    assert "mipproxy.public_address" in out.stdout + out.stderr
    assert not (tmp_path / "r").exists()
