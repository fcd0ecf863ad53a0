"""Config validation, the role registry, the control protocol and twistd itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import attrs
import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

import narsuite
from narsuite import config as cfgmod
from narsuite.config import ConfigError
from narsuite.control.narctl import render, request
from narsuite.control.server import ControlFactory
from narsuite.roles import RoleError, RoleRegistry
from narsuite.service import NarsuiteService
from narsuite.store import MemoryBackend, Store

sys.path.insert(0, os.path.dirname(__file__))
import demo_role

HERE = Path(__file__).resolve().parent


def registry_with_demo() -> RoleRegistry:
    """The four known roles undiscovered (whatever this build implements) plus the demo."""
    r = RoleRegistry(discover=False)
    r.register(demo_role.ROLE)
    return r


# ------------------------------------------------------------------ config
def test_embedded_default_config_loads() -> None:
    cfg = cfgmod.load()
    assert cfg.store.backend == "sqlite"
    assert cfg.manhole.enabled is False
    assert cfg.metrics.listen == "127.0.0.1"
    assert cfg.control_socket == Path("/run/narsuite/control.sock")


@pytest.mark.parametrize(
    "text, key, words",
    [
        ('[store]\nbackend = "etcd"', "store.backend", "expected one of 'memory', 'sqlite', 'redis'"),
        ('[store]\nbackend = "redis"', "store.redis.url", "set url (redis://host:port) or sentinels"),
        ('[store]\nbackend = "redis"\n[store.redis]\nurl = "redis://:pw@h:1"', "store.redis.url",
         "holds a password; put it in password_file"),
        ('[store]\nbackend = "redis"\n[store.redis]\nurl = "redis://h:1"', "cluster.node_id",
         "needs its own node_id"),
        ('[store.redis]\nsentinels = ["h"]', "store.redis.sentinels", "expected \"host:port\""),
        ("[store]\nflush_interval = 0", "store.flush_interval", "expected a number in"),
        ('[store]\nflush_interval = "fast"', "store.flush_interval", "got 'fast'; expected a number"),
        ("[store]\ncolour = 1", "store.colour", "unknown key; the keys of [store] are"),
        ("[metrics]\nport = 70000", "metrics.port", "got 70000"),
        ('[metrics]\nlisten = "localhost:9"', "metrics.listen", "expected an IP address"),
        ("[manhole]\nenabled = true", "manhole.enabled", "nobody can log in"),
        ('[manhole.users]\nroot = "secret"', "manhole.users.root", "expected a bcrypt ($2b$...), scrypt"),
        ('[manhole.users]\nroot = "$nt$8846f7eaee8fb117ad06bdd830b7586c"', "manhole.users.root",
         "NT hashes are not accepted for the manhole"),
        ('[manhole.users]\nroot = "$2b$12$short"', "manhole.users.root", "malformed bcrypt hash"),
        ('[store.pools.ra]\nnetwork = "10.8.0.0/33"', "store.pools.ra.network", "expected an IPv4 network"),
        ('[store.pools.ra]\nnetwork = "10.8.0.0/24"\nexclude = ["10.9.0.1"]',
         "store.pools.ra.exclude", "is not inside 10.8.0.0/24"),
        ("[store.pools.ra]\nexclude = []", "store.pools.ra.network", "missing"),
        ("[nosuch]\n", "nosuch", "unknown section [nosuch]"),
        ("[log]\nlevel = 3", "log.level", "got 3"),
        ("[store\n", "<config>", "not valid TOML"),
        ('[demo]\nttl = 0', "demo.ttl", "got 0.0; expected a number in [1, 86400]"),
    ],
)
def test_config_errors_name_key_value_and_expectation(text: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfgmod.loads(text, registry=registry_with_demo())
    assert e.value.key == key
    assert str(e.value).startswith(f"{key}: ")
    assert words in str(e.value)


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    f = tmp_path / "n.toml"
    f.write_text('[daemon]\nstate_dir = "state"\n[store.pools.ra]\nnetwork = "10.8.0.0/24"\n')
    cfg = cfgmod.load(f)
    assert cfg.store_path == tmp_path / "state" / "store.sqlite"
    assert str(cfg.store.pools["ra"].network) == "10.8.0.0/24"


def test_config_is_immutable() -> None:
    cfg = cfgmod.loads("")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.store.backend = "memory"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.store.pools["x"] = None  # type: ignore[index]


def test_role_section_built_with_the_roles_schema() -> None:
    cfg = cfgmod.loads('[demo]\ngreeting = "hi"', registry=registry_with_demo())
    assert cfg.role("demo") == demo_role.DemoConfig(greeting="hi")


# ------------------------------------------------------------------ roles
def test_role_resolution_lists_repeats_all_and_order() -> None:
    r = registry_with_demo()
    assert [s.name for s in r.resolve(["demo"])] == ["demo"]
    assert [s.name for s in r.resolve(["demo,demo", "demo"])] == ["demo"]
    assert [s.name for s in r.resolve(["all"])] == ["demo"]
    assert r.resolve([]) == []


def test_unimplemented_and_unknown_roles_are_refused() -> None:
    r = registry_with_demo()
    with pytest.raises(RoleError, match="'mipproxy' role is not implemented in this build.*implemented roles: demo"):
        r.resolve(["demo,mipproxy"])
    with pytest.raises(RoleError, match="unknown role 'socks'"):
        r.resolve(["socks"])


def test_the_four_roles_are_known() -> None:
    r = RoleRegistry()
    assert set(r.known()) >= {"nar", "ike", "esp", "mipproxy"}


# -------------------------------------------------------- service in-process
def _daemon(tmp_path: Path, clock: Clock, text: str = "") -> NarsuiteService:
    cfg = cfgmod.loads(
        textwrap.dedent(f"""
        [daemon]
        state_dir = "{tmp_path}/state"
        runtime_dir = "{tmp_path}/run"
        [control]
        enabled = false
        [metrics]
        enabled = false
        """) + text,
        registry=registry_with_demo(),
    )
    return NarsuiteService(cfg, [demo_role.ROLE], reactor=clock, store=Store(MemoryBackend(), clock))


def test_role_service_kinds_and_commands_plug_in(tmp_path: Path) -> None:
    clock = Clock()
    daemon = _daemon(tmp_path, clock, '[demo]\ngreeting = "hej"\nttl = 60\n')
    daemon.startService()
    try:
        assert daemon.namespace["demo"]["service"].started == 1
        greeting = daemon.store.get("demo.greeting", "boot")
        assert greeting.text == "hej" and greeting.spi > 255
        cmd, args = daemon.commands.resolve(["demo", "greetings"])
        assert cmd.handler(daemon, **args).rows == (("boot", "hej"),)
        clock.advance(61)
        assert daemon.store.get("demo.greeting", "boot") is None
    finally:
        daemon.stopService()


def _control(daemon: NarsuiteService, argv: list[str]) -> dict:
    proto = ControlFactory(daemon).buildProtocol(None)
    tr = StringTransport()
    proto.makeConnection(tr)
    proto.dataReceived(json.dumps({"argv": argv}).encode() + b"\n")
    return json.loads(tr.value())


def test_control_protocol_answers_and_errors(tmp_path: Path) -> None:
    daemon = _daemon(tmp_path, Clock())
    daemon.startService()
    try:
        status = _control(daemon, ["status"])
        assert status["ok"] and status["result"]["fields"]["roles"] == "demo"
        listing = _control(daemon, ["list", "demo.greeting"])["result"]
        assert listing["columns"][:4] == ["key", "name", "text", "spi"]
        assert listing["rows"][0]["text"] == "hello"
        assert "key" not in json.dumps(listing["rows"][0]).replace('"key": "boot"', "")  # secret not shown
        shown = _control(daemon, ["show", "demo.greeting", "boot"])["result"]["fields"]
        assert shown["owner"] == "demo:boot" and 3590 < shown["expires_in"] <= 3600
        assert _control(daemon, ["show", "demo.greeting", "nope"])["error"].startswith("no demo.greeting")
        assert "unknown record kind" in _control(daemon, ["list", "nope"])["error"]
        assert "usage: narctl show KIND KEY" in _control(daemon, ["show", "demo.greeting"])["error"]
        assert "unknown command" in _control(daemon, ["frobnicate"])["error"]
        help_rows = _control(daemon, ["help"])["result"]["rows"]
        assert any(r["command"] == "demo greetings" for r in help_rows)
    finally:
        daemon.stopService()


def test_control_protocol_rejects_garbage(tmp_path: Path) -> None:
    daemon = _daemon(tmp_path, Clock())
    proto = ControlFactory(daemon).buildProtocol(None)
    tr = StringTransport()
    proto.makeConnection(tr)
    proto.dataReceived(b"not json\n")
    answer = json.loads(tr.value())
    assert answer["ok"] is False and "one JSON object per line" in answer["error"]
    tr.clear()
    proto.dataReceived(b"x" * (70 * 1024))
    assert b"longer than" in tr.value() and tr.disconnecting


def test_narctl_renders_aligned_tables() -> None:
    text = render({"type": "table", "title": "t", "columns": ["a", "bb"],
                   "rows": [{"a": "x", "bb": 1}, {"a": "long", "bb": None}]})
    assert text.splitlines() == ["A     BB", "x     1", "long  -", "(2 t)"]


# ------------------------------------------------------------------- twistd
def _write_config(tmp_path: Path, metrics_port: int = 0, extra: str = "") -> Path:
    f = tmp_path / "narsuite.toml"
    f.write_text(textwrap.dedent(f"""
        [daemon]
        state_dir = "{tmp_path}/state"
        runtime_dir = "{tmp_path}/run"
        [metrics]
        port = {metrics_port}
        """) + extra)
    return f


def _wait_socket(path: Path, proc: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                request(str(path), ["status"])
                return
            except OSError:
                pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no control socket at {path}")


def test_twistd_refuses_bad_config_before_binding(tmp_path: Path) -> None:
    f = _write_config(tmp_path, extra='[store]\nbackend = "postgres"\n')
    out = subprocess.run([sys.executable, "-m", "twisted", "narsuite", "--config", str(f)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode != 0
    assert "store.backend: got 'postgres'" in out.stdout + out.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "state").exists()


def test_twistd_mipproxy_refuses_to_run_without_its_addresses(tmp_path: Path) -> None:
    """mipproxy is implemented: asked for without MIPP-Pub it stops before binding anything,
    naming the key (the section's defaults fail closed)."""
    f = _write_config(tmp_path)
    out = subprocess.run(["twistd", "-n", "--pidfile=", "narsuite", "--config", str(f), "--role=mipproxy"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode != 0
    assert "not implemented" not in out.stdout + out.stderr
    assert "mipproxy.public_address: the mipproxy role needs MIPP-Pub" in out.stdout + out.stderr
    assert not (tmp_path / "run").exists()


def test_twistd_runs_roles_and_narctl_reads_them(tmp_path: Path) -> None:
    f = _write_config(tmp_path, extra='[demo]\ngreeting = "from twistd"\n[log]\njson_file = "log.jsonl"\n')
    runner = HERE / "run_twistd_demo.py"
    sock = tmp_path / "run" / "control.sock"
    proc = subprocess.Popen([sys.executable, str(runner), "--config", str(f), "--role", "demo"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        _wait_socket(sock, proc)
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        env = dict(os.environ)
        out = subprocess.run(["narctl", "--socket", str(sock), "list", "demo.greeting"],
                             capture_output=True, text=True, env=env, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "from twistd" in out.stdout and out.stdout.startswith("KEY")
        out = subprocess.run(["narctl", "--config", str(f), "--json", "status"],
                             capture_output=True, text=True, timeout=30)
        status = json.loads(out.stdout)["fields"]
        assert status["roles"] == "demo" and status["version"] == narsuite.__version__
        metrics_port = int(status["metrics"].rsplit(":", 1)[1])
        assert status["metrics"].startswith("127.0.0.1:")
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'narsuite_store_records{kind="demo.greeting"} 1.0' in body
        assert "narsuite_demo_greetings_total 1.0" in body
        assert 'narsuite_control_requests_total{command="list"} 1.0' in body
        out = subprocess.run(["narctl", "--socket", str(sock), "show", "demo.greeting", "nope"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 1 and "no demo.greeting record" in out.stderr
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    # twistd re-raises SIGTERM after a clean shutdown (exit by the signal, as daemons do)
    assert proc.returncode in (0, -15), output
    assert "Server Shut Down." in output
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()
              if line.strip()]
    assert any(e.get("log_namespace") == "narsuite.service" for e in events)
    assert not sock.exists()


def test_twistd_log_file_is_capped_by_config(tmp_path: Path) -> None:
    """twistd keeps every rotated log file forever by default; narsuite's observer rotates
    at [log] max_bytes and keeps [log] max_files, whatever is logged."""
    f = _write_config(tmp_path, extra="[demo]\n[log]\nmax_bytes = 10000\nmax_files = 2\n")
    sock = tmp_path / "run" / "control.sock"
    logfile = tmp_path / "logs" / "narsuite.log"
    env = dict(os.environ, NARSUITE_TEST_TWISTD_ARGS=f"--logfile={logfile}")
    proc = subprocess.Popen([sys.executable, str(HERE / "run_twistd_demo.py"), "--config", str(f), "--role", "demo"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env)
    try:
        _wait_socket(sock, proc)
        out = subprocess.run(["narctl", "--socket", str(sock), "demo", "chatter", "3000"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    files = sorted(p.name for p in logfile.parent.iterdir())
    assert files == ["narsuite.log", "narsuite.log.1", "narsuite.log.2"], (files, output)
    sizes = [(logfile.parent / n).stat().st_size for n in files]
    assert all(s <= 10_000 + 300 for s in sizes), sizes  # ~350 kB were logged
    assert "demo chatter 002999" in logfile.read_text() + (logfile.parent / "narsuite.log.1").read_text()
