"""SOCKS5 access rules: first match wins, no match blocks.

A rule matches when every one of its conditions holds: client address in
``clients``, user in ``users`` (empty: anyone, authenticated or not),
command in ``commands`` (connect/bind/udp/nar), destination in ``to`` and
port in ``ports`` (empty: any).  Destinations are IP addresses: the server
resolves a domain name first and checks each address it would use, so a
name cannot smuggle a connection past an address rule.

Every decision is logged at the rule's ``log`` level (or the configured
default; the default-deny decision uses the default) with the client, user,
command, destination and the rule index (``-1`` for the default deny).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import attrs
from twisted.logger import Logger

from narsuite.logs import LEVELS, logger
from narsuite.nar.config import Rule

__all__ = ["Decision", "RuleSet", "CompiledRule"]

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


@attrs.frozen
class Decision:
    allowed: bool
    index: int  # rule index, -1: no rule matched (default deny)
    rule: Rule | None


def _nets(items: Sequence[str]) -> tuple[IPNet, ...] | None:
    if "any" in items:
        return None
    return tuple(ipaddress.ip_network(i, strict=False) for i in items)


def _ports(items: Sequence[str]) -> tuple[tuple[int, int], ...] | None:
    if not items:
        return None
    out = []
    for item in items:
        lo, _, hi = item.partition("-")
        out.append((int(lo), int(hi or lo)))
    return tuple(out)


def _addr(a: str | IPAddr | None) -> IPAddr | None:
    if a is None or not isinstance(a, str):
        return a
    try:
        ip = ipaddress.ip_address(a.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _in(ip: IPAddr | None, nets: tuple[IPNet, ...] | None) -> bool:
    if nets is None:
        return True
    if ip is None:
        return False
    return any(ip in n for n in nets)


@attrs.frozen
class CompiledRule:
    rule: Rule
    clients: tuple[IPNet, ...] | None
    users: frozenset[str] | None
    commands: frozenset[str]
    to: tuple[IPNet, ...] | None
    ports: tuple[tuple[int, int], ...] | None

    @classmethod
    def of(cls, rule: Rule) -> CompiledRule:
        return cls(rule, _nets(rule.clients), frozenset(rule.users) if rule.users else None,
                   frozenset(rule.commands), _nets(rule.to), _ports(rule.ports))

    def matches(self, client: IPAddr | None, user: str, command: str,
                dest: IPAddr | None, port: int | None) -> bool:
        if command not in self.commands:
            return False
        if self.users is not None and user not in self.users:
            return False
        if not _in(client, self.clients) or not _in(dest, self.to):
            return False
        if self.ports is not None:
            if port is None or not any(lo <= port <= hi for lo, hi in self.ports):
                return False
        return True


class RuleSet:
    """The ``[nar] rules`` of a config, compiled once."""

    def __init__(self, rules: Sequence[Rule], default_level: str = "info", log: Logger | None = None) -> None:
        self.rules = tuple(CompiledRule.of(r) for r in rules)
        self.default_level = default_level
        self.log = log or logger()

    def check(self, client: str, user: str, command: str, dest: str | None, port: int | None,
              name: str | None = None) -> Decision:
        """Decide and log.  ``dest`` is an IP (after resolution; ``name`` is the
        requested domain name, logged only); ``None`` only matches rules with
        ``to = ["any"]`` and no ports."""
        c, d = _addr(client), _addr(dest)
        decision = Decision(False, -1, None)
        for i, r in enumerate(self.rules):
            if r.matches(c, user, command, d, port):
                decision = Decision(r.rule.action == "pass", i, r.rule)
                break
        level = (decision.rule.log if decision.rule is not None and decision.rule.log
                 else self.default_level)
        where = f"{name}={dest}" if name and name != dest else f"{dest}"
        self.log.emit(LEVELS[level],
                      "socks {action} client={client} user={user!r} command={command} "
                      "to={where}:{port} rule={rule}",
                      action="pass" if decision.allowed else "block", client=client, user=user,
                      command=command, dest=dest, dest_name=name, where=where, port=port,
                      rule=decision.index)
        return decision

    def may_pass(self, client: str, user: str, command: str) -> bool:
        """Could some destination pass?  For requests whose destinations come later
        (UDP ASSOCIATE: each datagram is then checked with :meth:`check`).

        Walks the rules in order: the first rule matching client, user and
        command that is a ``pass`` says yes; a ``block`` with no destination or
        port condition says no; other blocks are skipped.  Logged like a decision.
        """
        c = _addr(client)
        allowed, index, rule = False, -1, None
        for i, r in enumerate(self.rules):
            if not (command in r.commands and (r.users is None or user in r.users) and _in(c, r.clients)):
                continue
            if r.rule.action == "pass":
                allowed, index, rule = True, i, r.rule
                break
            if r.to is None and r.ports is None:
                index, rule = i, r.rule
                break
        level = rule.log if rule is not None and rule.log else self.default_level
        self.log.emit(LEVELS[level],
                      "socks {action} client={client} user={user!r} command={command} to=(any) rule={rule}",
                      action="pass" if allowed else "block", client=client, user=user, command=command,
                      rule=index)
        return allowed
