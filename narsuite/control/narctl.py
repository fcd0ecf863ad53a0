"""narctl: talk to a running narsuite daemon over its control socket.

Usage::

    narctl [--socket PATH | --config FILE] [--json] COMMAND [ARGS...]
    narctl status
    narctl list store.lease
    narctl show store.lease spi/1234567
    narctl help                      # every command the daemon answers, roles' included
    narctl hash-password             # bcrypt hash for [manhole.users] (local, no daemon)
    narctl hash-password --nt        # NT hash for [ike.users] entries used by EAP-MSCHAPv2

Plain blocking sockets on purpose: a CLI has no reactor to share.
"""

from __future__ import annotations

import argparse
import getpass
import json
import socket
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "request", "render"]


def request(path: str, argv: Sequence[str], timeout: float = 10.0) -> dict:
    """Send one command, return the daemon's JSON answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps({"argv": list(argv)}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    if not buf:
        raise ConnectionError("the daemon closed the connection without answering")
    return json.loads(buf)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(_cell(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def render(result: dict) -> str:
    """Human text for a result: aligned tables, key/value blocks."""
    kind = result.get("type")
    lines: list[str] = []
    if kind == "table":
        columns = result["columns"]
        rows = [[_cell(r.get(c)) for c in columns] for r in result["rows"]]
        widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
        lines.append("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
        for r in rows:
            lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
        if result.get("title"):
            lines.append(f"({len(rows)} {result['title']})")
    elif kind == "record":
        fields = result["fields"]
        width = max((len(k) for k in fields), default=0)
        for k, v in fields.items():
            lines.append(f"{k.ljust(width)}  {_cell(v)}")
    else:
        lines.append(str(result.get("text", "")))
    return "\n".join(lines)


def _socket_path(args: argparse.Namespace) -> str:
    """The socket named on the command line, or the one the config file names.

    Only ``[daemon]`` and ``[control]`` are read: narctl must work with a file
    whose role sections belong to roles installed only next to the daemon.
    """
    if args.socket:
        return args.socket
    import tomllib
    from pathlib import Path

    from narsuite import config as cfgmod
    from narsuite.schema import build

    path = Path(args.config) if args.config else cfgmod.DEFAULT_CONFIG
    try:
        doc = tomllib.loads(path.read_text())
        base = path.resolve().parent
        daemon = build(cfgmod.DaemonConfig, doc.get("daemon", {}), "daemon", base)
        control = build(cfgmod.ControlConfig, doc.get("control", {}), "control", base)
    except (OSError, tomllib.TOMLDecodeError, cfgmod.ConfigError) as e:
        raise SystemExit(f"narctl: {path}: {e}") from None
    return str(control.socket or daemon.runtime_dir / "control.sock")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="narctl", description="Control a running narsuite daemon.",
        epilog="Run `narctl help` for the commands the daemon answers (roles add their own).",
    )
    parser.add_argument("--socket", help="control socket (default: from the config)")
    parser.add_argument("--config", help="narsuite config file to find the socket in")
    parser.add_argument("--json", action="store_true", help="print the raw JSON result")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="status | list KIND | show KIND KEY | help ...")
    args = parser.parse_args(argv)
    words = list(args.command)
    if not words:
        words = ["status"]
    if words[0] == "hash-password":
        from narsuite.passwords import hash_password

        # --nt: the NT hash EAP-MSCHAPv2 needs (password-equivalent for it; see docs/roles/ike.md)
        scheme = "nt" if "--nt" in words[1:] else "bcrypt"

        password = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else \
            getpass.getpass("password: ")
        try:
            print(hash_password(password, scheme))
        except ValueError as e:
            print(f"narctl: {e}", file=sys.stderr)
            return 2
        return 0
    path = _socket_path(args)
    try:
        answer = request(path, words)
    except FileNotFoundError:
        print(f"narctl: no control socket at {path}: is the daemon running? (--socket/--config)",
              file=sys.stderr)
        return 2
    except (ConnectionError, OSError) as e:
        print(f"narctl: {path}: {e}", file=sys.stderr)
        return 2
    if not answer.get("ok"):
        print(f"narctl: {answer.get('error')}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer["result"], indent=2, sort_keys=False))
    else:
        print(render(answer["result"]))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
