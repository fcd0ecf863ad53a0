"""The README's two commands, as an operator types them on a fresh machine.

The first runs the daemon with every implemented role on the embedded default config
(etc/narsuite.toml); it once failed there because a role needed keys that config lacks,
and no test ran it: this one does, in a lab namespace (so its ports are its own), with
the config file unchanged except for where state and runtime files go.  The second is
what CI runs (.ci/run), so the two cannot drift apart.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from narsuite.lab.daemon import NarsuiteDaemon
from narsuite.roles import default_registry

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [m.group(1) for m in re.finditer(r"^    (bash scripts/setup\.sh && .+)$", text, re.M)]


def test_readme_has_the_two_commands_and_ci_runs_the_second() -> None:
    run, test = readme_commands()
    assert "twistd -n narsuite" in run and "pytest" in test
    ci = (ROOT / ".ci" / "run").read_text()
    assert test.split("&& ", 1)[1] in ci, "the README's test command and .ci/run drifted apart"


def test_readme_run_command_starts_every_implemented_role(lab, tmp_path: Path) -> None:
    run, _ = readme_commands()
    argv = shlex.split(run.split("&& ", 1)[1])
    config = ROOT / argv[argv.index("--config") + 1]
    roles = next(a.split("=", 1)[1] for a in argv if a.startswith("--role="))
    text = config.read_text()
    # Only where files go changes: the daemon in the test must not touch /var/lib or /run.
    for key, where in (("state_dir", tmp_path / "state"), ("runtime_dir", tmp_path / "run")):
        text, n = re.subn(rf'^{key} = ".*"$', f'{key} = "{where}"', text, count=1, flags=re.M)
        assert n == 1, f"[daemon] {key} not found in {config}"
    conf = tmp_path / "narsuite.toml"
    conf.write_text(text)
    host = lab.host("d")
    daemon = NarsuiteDaemon(host, conf, roles=roles, socket=tmp_path / "run" / "control.sock")
    daemon.start(timeout=60)
    try:
        status = dict(line.split(None, 1) for line in daemon.narctl("status").stdout.splitlines() if " " in line)
        running = sorted(r.strip() for r in status["roles"].split(","))
        assert running == sorted(spec.name for spec in default_registry().resolve([roles])), status
    finally:
        daemon.terminate()
