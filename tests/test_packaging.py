"""A plain ``pip install .`` gives a working ``twistd narsuite`` and the console scripts."""

from __future__ import annotations

import site
import subprocess
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_plain_pip_install_gives_plugin_and_scripts(tmp_path: Path, monkeypatch) -> None:
    # The installed copy must be what imports: a PYTHONPATH naming a checkout (as when the
    # suite runs from a worktree) would put that first.
    monkeypatch.delenv("PYTHONPATH", raising=False)
    env_dir = tmp_path / "venv"
    # The running interpreter's site-packages supply the dependencies (no network needed),
    # as plain path entries: their .pth files -- the checkout's editable install among
    # them -- are not processed, so narsuite comes only from the wheel built below.
    # (Not system_site_packages: the tests run in scripts/setup.sh's venv, whose packages
    # are not the base interpreter's.)
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    env_site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    Path(env_site, "narsuite-test-deps.pth").write_text(
        "\n".join(p for p in site.getsitepackages() if Path(p).is_dir()) + "\n")
    wheel_dir = tmp_path / "wheels"
    subprocess.run([str(py), "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(wheel_dir), str(ROOT)], check=True, timeout=300, cwd=tmp_path)
    (wheel,) = wheel_dir.glob("narsuite-*.whl")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall",
                    str(wheel)], check=True, timeout=300, cwd=tmp_path)
    where = subprocess.run([str(py), "-c", "import narsuite; print(narsuite.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert str(env_dir) in where, where  # the installed copy, not the checkout
    # twistd, run by the venv's interpreter
    twistd = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
    out = subprocess.run([str(py), "-c", twistd, "narsuite", "--help"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "--role" in out.stdout and "--config" in out.stdout
    out = subprocess.run([str(env_dir / "bin" / "narctl"), "--help"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0 and "narctl" in out.stdout
    out = subprocess.run([str(env_dir / "bin" / "narsuite-lab"), "--help"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0
    # the embedded default config ships with the package
    out = subprocess.run([str(py), "-c", "from narsuite.config import load; print(load().store.backend)"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.stdout.strip() == "sqlite", out.stderr
