"""The role registry: how nar, ike, esp and mipproxy plug into the daemon.

A role is a package ``narsuite.<name>`` whose module ``narsuite.<name>.role``
defines ``ROLE``, a :class:`RoleSpec`.  The spec carries everything the
platform needs: the config section schema, a factory for the role's service,
the store record kinds it owns and the control commands it answers.  The
plugin file never changes when a role arrives; a package that is absent or
has no ``role`` module yet is *known but not implemented* and asking for it is
refused with a clear message rather than starting something that pretends to
run.  Third-party roles can register through the ``narsuite.roles`` entry
point group.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from twisted.application.service import IService

    from narsuite.control.commands import Command
    from narsuite.service import RoleContext
    from narsuite.store.kinds import KindSpec

__all__ = ["RoleSpec", "RoleRegistry", "RoleError", "default_registry", "KNOWN_ROLES"]

#: The roles narsuite is designed to carry, in start order (the data planes
#: before the signalling that installs state into them).
KNOWN_ROLES: tuple[str, ...] = ("esp", "ike", "nar", "mipproxy")


class RoleError(ValueError):
    """A requested role cannot run (unknown, or not implemented in this build)."""


@attrs.frozen
class RoleSpec:
    """What one role contributes to the daemon."""

    name: str
    description: str
    #: attrs class for the role's ``[name]`` config section (see narsuite.schema).
    config_class: type
    #: Builds the role's service from the shared context (store, metrics, config...).
    make_service: Callable[[RoleContext], IService]
    #: Store record kinds the role owns (registered before any service starts).
    kinds: Sequence[KindSpec] = ()
    #: Control commands (``narctl <name> ...``) the role answers.
    commands: Sequence[Command] = ()
    #: Prefixes of store owner names that live only in this process (an IKE SA, a NAR
    #: connection): their records left on disk by a crash are dropped when the store
    #: opens (``Store.declare_volatile_owners``).
    volatile_owners: Sequence[str] = ()
    #: Checks what the role needs to *run* (its section is built, with defaults, even
    #: when the role is not asked for); raises ConfigError naming the key.
    check_config: Callable[[Any], None] | None = None


class RoleRegistry:
    """Name -> RoleSpec, discovered lazily from the role packages."""

    def __init__(self, known: Iterable[str] = KNOWN_ROLES, discover: bool = True) -> None:
        self._known = list(known)
        self._specs: dict[str, RoleSpec | None] = {}
        self._discover = discover
        self._loaded = False

    def register(self, spec: RoleSpec) -> None:
        if spec.name not in self._known:
            self._known.append(spec.name)
        self._specs[spec.name] = spec

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if not self._discover:
            return
        for name in list(self._known):
            if name in self._specs:
                continue
            try:
                module = importlib.import_module(f"narsuite.{name}.role")
            except ModuleNotFoundError as e:
                if e.name not in (f"narsuite.{name}", f"narsuite.{name}.role"):
                    raise
                self._specs[name] = None
                continue
            self._specs[name] = module.ROLE
        for ep in entry_points(group="narsuite.roles"):
            spec = ep.load()
            self.register(spec)

    def known(self) -> list[str]:
        self._load()
        return list(self._known)

    def implemented(self) -> list[str]:
        self._load()
        return [n for n in self._known if self._specs.get(n) is not None]

    def get(self, name: str) -> RoleSpec | None:
        self._load()
        return self._specs.get(name)

    def resolve(self, requested: Iterable[str]) -> list[RoleSpec]:
        """Turn ``--role`` values (repeatable, comma lists, ``all``) into specs.

        Order follows :data:`KNOWN_ROLES`, duplicates collapse.  Unknown or
        unimplemented names raise :class:`RoleError` naming them.
        """
        names: list[str] = []
        for item in requested:
            for part in item.split(","):
                part = part.strip()
                if not part:
                    continue
                if part == "all":
                    names.extend(self.implemented())
                    continue
                if part not in self.known():
                    raise RoleError(
                        f"--role: unknown role {part!r}; the roles are "
                        f"{', '.join(self.known())} (or all)"
                    )
                if self.get(part) is None:
                    done = ", ".join(self.implemented()) or "none yet"
                    raise RoleError(
                        f"--role: the {part!r} role is not implemented in this build of "
                        f"narsuite; implemented roles: {done}"
                    )
                names.append(part)
        order = {n: i for i, n in enumerate(self.known())}
        return [self._specs[n] for n in sorted(set(names), key=order.__getitem__)]  # type: ignore[misc]


_default: RoleRegistry | None = None


def default_registry() -> RoleRegistry:
    global _default
    if _default is None:
        _default = RoleRegistry()
    return _default


def role_names(specs: Iterable[RoleSpec]) -> list[str]:
    return [s.name for s in specs]
