"""Control commands: what ``narctl`` can ask the running daemon.

A command is a name of one or more words (``status``, ``list``, ``nar
flush``), positional argument names, and a handler that returns a result
object (or a Deferred of one).  The platform registers ``status``, ``kinds``,
``list``, ``show``, ``pools``, ``udp`` and ``help``; each role adds its own through its
:class:`narsuite.roles.RoleSpec`.  Results are small typed records that the
client renders as tables or key/value blocks, or prints as JSON.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from narsuite import __version__
from narsuite.store.kinds import display_value, format_key

if TYPE_CHECKING:
    from narsuite.service import NarsuiteService

__all__ = ["Command", "CommandError", "CommandRegistry", "Table", "Record", "platform_commands"]


class CommandError(Exception):
    """A command was asked wrongly or names something that does not exist."""


@attrs.frozen
class Table:
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    title: str = ""

    def to_json(self) -> dict:
        return {"type": "table", "title": self.title, "columns": list(self.columns),
                "rows": [dict(zip(self.columns, r)) for r in self.rows]}


@attrs.frozen
class Record:
    fields: tuple[tuple[str, Any], ...]
    title: str = ""

    def to_json(self) -> dict:
        return {"type": "record", "title": self.title, "fields": dict(self.fields)}


@attrs.frozen
class Command:
    name: str
    help: str
    handler: Callable[..., Any]
    args: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(self.name.split())

    def usage(self) -> str:
        parts = [self.name] + [a.upper() for a in self.args] + [f"[{a.upper()}]" for a in self.optional]
        return " ".join(parts)


class CommandRegistry:
    def __init__(self) -> None:
        self._commands: dict[tuple[str, ...], Command] = {}

    def add(self, command: Command) -> None:
        if command.words in self._commands:
            raise ValueError(f"control command {command.name!r} is registered twice")
        self._commands[command.words] = command

    def commands(self) -> list[Command]:
        return sorted(self._commands.values(), key=lambda c: c.name)

    def resolve(self, argv: Sequence[str]) -> tuple[Command, dict[str, str]]:
        """Longest command name that prefixes ``argv``; the rest are its arguments."""
        for n in range(len(argv), 0, -1):
            cmd = self._commands.get(tuple(argv[:n]))
            if cmd is None:
                continue
            rest = list(argv[n:])
            if len(rest) < len(cmd.args) or len(rest) > len(cmd.args) + len(cmd.optional):
                raise CommandError(f"usage: narctl {cmd.usage()}")
            names = cmd.args + cmd.optional
            return cmd, dict(zip(names, rest))
        raise CommandError(
            f"unknown command {' '.join(argv) or '(none)'!r}; try `narctl help`"
        )


# --------------------------------------------------------------------- platform
def _status(daemon: NarsuiteService) -> Record:
    store = daemon.store
    fields: list[tuple[str, Any]] = [
        ("version", __version__),
        ("pid", os.getpid()),
        ("uptime_seconds", round(time.time() - daemon.started_at, 1) if daemon.started_at else 0),
        ("roles", ", ".join(daemon.role_names) or "(none)"),
        ("config", str(daemon.config.source or "(built-in defaults)")),
        ("store_backend", daemon.config.store.backend),
        ("store_records", store.count()),
    ]
    for key, value in daemon.endpoints().items():
        fields.append((key, value))
    for spec in store.kinds():
        fields.append((f"records.{spec.name}", store.count(spec.name)))
    for key, value in store.backend.stats().items():
        fields.append((f"store.{key}", value))
    return Record(tuple(fields), title="narsuite")


def _kinds(daemon: NarsuiteService) -> Table:
    store = daemon.store
    rows = tuple((s.name, store.count(s.name), "yes" if s.persist else "no", s.description)
                 for s in store.kinds())
    return Table(("kind", "records", "persisted", "description"), rows)


def _kind_or_error(daemon: NarsuiteService, kind: str):
    names = [s.name for s in daemon.store.kinds()]
    if kind not in names:
        raise CommandError(f"unknown record kind {kind!r}; the kinds are: {', '.join(names)}")
    return daemon.store.kind(kind)


def _expires_in(daemon: NarsuiteService, expires: float | None) -> Any:
    if expires is None:
        return None
    return round(expires - daemon.store.clock.seconds(), 1)


def _list(daemon: NarsuiteService, kind: str) -> Table:
    spec = _kind_or_error(daemon, kind)
    columns = spec.columns or spec.public_fields()
    rows = []
    for key, record, expires, owner in daemon.store.items(kind):
        row = spec.as_row(record)
        rows.append((format_key(key), *(row[c] for c in columns), _expires_in(daemon, expires), owner))
    rows.sort(key=lambda r: r[0])
    return Table(("key", *columns, "expires_in", "owner"), tuple(rows), title=kind)


def _show(daemon: NarsuiteService, kind: str, key: str) -> Record:
    spec = _kind_or_error(daemon, kind)
    for k, record, expires, owner in daemon.store.items(kind):
        if format_key(k) == key:
            fields = [("key", format_key(k)), *spec.as_row(record).items(),
                      ("expires_in", _expires_in(daemon, expires)), ("owner", owner)]
            return Record(tuple(fields), title=f"{kind} {key}")
    raise CommandError(f"no {kind} record with key {key!r}; see `narctl list {kind}`")


def _pools(daemon: NarsuiteService) -> Table:
    rows = []
    for name, pool in sorted(daemon.store.pools().items()):
        used, size = daemon.store.pool_usage(name)
        rows.append((name, str(pool.network), used, size))
    return Table(("pool", "network", "leased", "size"), tuple(rows))


def _udp(daemon: NarsuiteService) -> Table:
    rows = tuple((port, name, value) for port, counters in daemon.udp.stats().items()
                 for name, value in sorted(counters.items()))
    return Table(("port", "counter", "value"), rows,
                 title="shared UDP ports: datagrams per handler, short, unclaimed, handler errors")


def _cluster(daemon: NarsuiteService) -> Table:
    """The nodes sharing this store (live heartbeats), their roles, the leader, the store's health."""
    from narsuite.store.redis import RedisBackend  # light: the redis client is imported lazily

    be = daemon.store.backend
    me = daemon.config.cluster.node_id or "-"
    cols = ("node", "roles", "host", "pid", "heartbeat", "leader")
    if not isinstance(be, RedisBackend):  # the only shared backend
        return Table(cols, ((me, ", ".join(daemon.role_names), "", os.getpid(), "", "yes"),),
                     title=f"one node: store backend {daemon.config.store.backend} is not shared")
    now = time.time()
    rows = tuple((name + (" (this node)" if name == me else ""), ", ".join(info.get("roles", ())),
                  info.get("host", ""), info.get("pid", ""), f"{now - float(info.get('seen', now)):.1f}s ago",
                  "yes" if name == be.leader else "")
                 for name, info in sorted(be.nodes.items()))
    health = "reachable" if be.available else f"UNREACHABLE ({be.last_error}): new allocations refused"
    return Table(cols, rows, title=f"store {be.where}: {health}")


def _adopt(daemon: NarsuiteService, node: str | None = None) -> Table:
    """Carry on the SAs another node sealed (keepalived's notify_master runs this on the new active)."""
    sealer = getattr(daemon, "sealer", None)
    if sealer is None:
        raise CommandError("nothing to adopt: needs store.backend = \"redis\" and cluster.key_file")
    done = sealer.adopt(node, daemon.config.cluster.seq_margin)
    return Table(("kind", "adopted"), tuple(sorted(done.items())), title=f"adopted from {node or 'every other node'}")


def _help(daemon: NarsuiteService) -> Table:
    rows = tuple((c.usage(), c.help) for c in daemon.commands.commands())
    return Table(("command", "what it does"), rows)


def platform_commands() -> list[Command]:
    return [
        Command("status", "daemon, roles, endpoints and store summary", _status),
        Command("kinds", "record kinds in the store, with counts", _kinds),
        Command("list", "every record of a kind", _list, args=("kind",)),
        Command("show", "one record by its key (as `list` prints it)", _show, args=("kind", "key")),
        Command("pools", "address pools and their usage", _pools),
        Command("cluster", "nodes sharing the store, their roles, the leader and the store's health", _cluster),
        Command("cluster adopt", "carry on the SAs another node sealed (after it died)", _adopt, optional=("node",)),
        Command("udp", "the shared UDP ports' counters (per handler, short, unclaimed, handler errors)", _udp),
        Command("help", "the commands this daemon answers", _help),
    ]


def jsonable(value: Any) -> Any:
    if isinstance(value, (Table, Record)):
        return value.to_json()
    if isinstance(value, dict):
        return {"type": "record", "title": "", "fields": {k: display_value(v) for k, v in value.items()}}
    if isinstance(value, str):
        return {"type": "text", "text": value}
    return {"type": "text", "text": str(display_value(value))}
