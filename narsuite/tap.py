"""``twistd narsuite``: options and makeService (the plugin file points here).

Everything that can be wrong with the config or the role list is found in
``postOptions`` and reported as a usage error, so twistd exits non-zero
before it daemonizes or binds anything.
"""

from __future__ import annotations

from twisted.python import usage

from narsuite.config import ConfigError, load
from narsuite.roles import RoleError, default_registry
from narsuite.store import StoreBackendError

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    synopsis = "[--config FILE] [--role ROLE[,ROLE...]]..."
    longdesc = (
        "Run narsuite roles (esp, ike, nar, mipproxy; `all` for every implemented one) "
        "in one process sharing one reactor and one mapping store. Without --role only "
        "the platform runs: store, control socket, metrics and manhole."
    )
    optParameters = [
        ["config", "c", None, "TOML config file (default: the embedded etc/narsuite.toml)"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["role"] = []

    def opt_role(self, value: str) -> None:
        """Role(s) to run: repeat, or give a comma list, or `all`."""
        self["role"].append(value)

    opt_r = opt_role

    def postOptions(self) -> None:
        registry = default_registry()
        try:
            self["specs"] = registry.resolve(self["role"])
            self["loaded_config"] = load(self["config"], registry=registry)
            for spec in self["specs"]:
                if spec.check_config is not None:
                    spec.check_config(self["loaded_config"].role(spec.name))
        except (ConfigError, RoleError) as e:
            raise usage.UsageError(str(e)) from None
        self["reactor"] = install_reactor(self["loaded_config"].daemon.reactor)


def install_reactor(choice: str) -> str:
    """Install narsuite's lean epoll reactor for ``twistd narsuite`` (``[daemon] reactor``).

    twistd installs a reactor while parsing its own options only when ``--reactor``
    is given; otherwise the first ``import twisted.internet.reactor`` installs
    Twisted's default, and that happens after this (postOptions of the subcommand).
    So the operator's ``--reactor`` always wins, and without it ``twistd -n narsuite``
    runs what the benchmarks measure.  Returns the name of the reactor in use.
    """
    import sys

    if "twisted.internet.reactor" in sys.modules:
        return type(sys.modules["twisted.internet.reactor"]).__module__
    if choice != "narsuite-epoll" or not sys.platform.startswith("linux"):
        return "twisted"
    from narsuite import reactor as lean
    from narsuite.twisted_private import missing

    if missing():  # a Twisted without the private names it uses: the default, not a crash
        return "twisted"
    lean.install()
    return lean.__name__


def makeService(options: Options):
    from narsuite.service import NarsuiteService

    try:
        return NarsuiteService(options["loaded_config"], options["specs"],
                               twistd_options=getattr(options, "parent", None))
    except StoreBackendError as e:
        raise SystemExit(f"narsuite: {e}") from None
