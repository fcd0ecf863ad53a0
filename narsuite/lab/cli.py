"""``narsuite-lab``: inspect and clean up lab namespaces, or bring a topology up by hand.

::

    narsuite-lab list              # lab namespaces, their creator PID and whether it lives
    narsuite-lab sweep             # delete those whose creator is gone
    narsuite-lab up nar|ra|mip     # build a topology, print its namespaces, wait for Ctrl-C
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from typing import Any

import attrs

from .netns import (
    DEFAULT_PREFIX,
    Host,
    Lab,
    LabError,
    _creator_alive,
    lab_namespaces,
    parse_netns_name,
    sweep_stale,
)
from .topologies import mip_topology, nar_topology, remote_access_topology

TOPOLOGIES: dict[str, Callable[[Lab], Any]] = {"nar": nar_topology, "ra": remote_access_topology, "mip": mip_topology}


def _cmd_list(args) -> int:
    names = lab_namespaces(args.prefix)
    for name in names:
        parsed = parse_netns_name(name, args.prefix)
        assert parsed is not None  # lab_namespaces lists only names that parse
        pid, tag, host = parsed
        state = "alive" if _creator_alive(name, pid) else "stale"
        print(f"{name}\tpid={pid}\t{state}\thost={host}")
    if not names and args.verbose:
        print("no lab namespaces", file=sys.stderr)
    return 0


def _cmd_sweep(args) -> int:
    removed = sweep_stale(args.prefix)
    for name in removed:
        print(f"removed {name}")
    if args.verbose:
        print(f"{len(removed)} stale namespace(s) removed", file=sys.stderr)
    return 0


def _cmd_up(args) -> int:
    with Lab(args.prefix) as lab:
        topo = TOPOLOGIES[args.topology](lab)
        for f in attrs.fields(type(topo)):
            value = getattr(topo, f.name)
            if isinstance(value, Host):
                value = f"{value.netns}  (ip netns exec {value.netns} ...)"
            elif hasattr(value, "host") and isinstance(value.host, Host):
                value = f"switch in {value.host.netns}"
            print(f"{f.name:18} {value}")
        print("up; Ctrl-C (or SIGTERM) tears it down", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--prefix", default=DEFAULT_PREFIX,
                        help="namespace name prefix (default %(default)s)")
    common.add_argument("-v", "--verbose", action="store_true")
    parser = argparse.ArgumentParser(prog="narsuite-lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", parents=[common], help="list lab namespaces"
                   ).set_defaults(func=_cmd_list)
    sub.add_parser("sweep", parents=[common], help="remove namespaces of dead labs"
                   ).set_defaults(func=_cmd_sweep)
    up = sub.add_parser("up", parents=[common], help="build a topology and wait for Ctrl-C")
    up.add_argument("topology", choices=sorted(TOPOLOGIES))
    up.set_defaults(func=_cmd_up)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LabError as exc:
        print(f"narsuite-lab: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
