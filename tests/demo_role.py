"""A small but real role used by the platform tests to prove that roles plug in.

It registers a config section, a record kind and a control command, and its
service writes a record into the store when it starts — everything a real
role does with the platform, nothing pretending to be nar/ike/esp/mipproxy.
"""

from __future__ import annotations

import attrs
from twisted.application import service

from narsuite.control.commands import Command, Table
from narsuite.roles import RoleSpec
from narsuite.schema import in_range, setting
from narsuite.store import Index, KindSpec, secret


@attrs.frozen
class DemoConfig:
    greeting: str = setting("hello")
    ttl: float = setting(3600.0, check=in_range(1, 86400))


@attrs.frozen
class Greeting:
    name: str
    text: str
    spi: int = 0
    key: bytes = secret(default=b"")


GREETING = KindSpec(
    name="demo.greeting",
    record=Greeting,
    key=lambda r: r.name,
    indexes=(Index("spi", lambda r: r.spi or None),),
    columns=("name", "text", "spi"),
    description="greetings written by the demo role",
)


class DemoService(service.Service):
    def __init__(self, ctx) -> None:  # type: ignore[no-untyped-def]
        self.ctx = ctx
        self.started = 0
        ctx.namespace["service"] = self
        self.counter = ctx.metrics.counter("demo", "greetings", "Greetings written")

    def startService(self) -> None:
        super().startService()
        self.started += 1
        store = self.ctx.store
        if store.get("demo.greeting", "boot") is None:
            d = store.allocate_spi("demo:boot")
            d.addCallback(lambda spi: store.insert(
                Greeting("boot", self.ctx.role_config.greeting, spi, key=b"k" * 16),
                ttl=self.ctx.role_config.ttl, owner="demo:boot"))
            d.addCallback(lambda _: self.counter.inc())


def _chatter(daemon, n: str) -> Table:  # type: ignore[no-untyped-def]
    """Log ``n`` lines of 100 characters (for the log-size tests)."""
    from narsuite.logs import logger

    log = logger("demo")
    for i in range(int(n)):
        log.info("demo chatter {i:06d} " + "x" * 78, i=i)
    return Table(("logged",), ((int(n),),))


def _greetings(daemon) -> Table:  # type: ignore[no-untyped-def]
    rows = tuple((g.name, g.text) for g in daemon.store.records("demo.greeting"))
    return Table(("name", "text"), rows)


ROLE = RoleSpec(
    name="demo",
    description="test role",
    config_class=DemoConfig,
    make_service=DemoService,
    kinds=(GREETING,),
    commands=(Command("demo greetings", "list the greetings", _greetings),
              Command("demo chatter", "log N lines", _chatter, args=("n",))),
)
