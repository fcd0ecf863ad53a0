"""The Twisted private attributes narsuite's fast paths use are all there (names, not AttributeErrors)."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest
from twisted.internet import abstract

from narsuite import twisted_private
from twisted import version as twisted_version


def test_every_private_attribute_used_exists() -> None:
    gone = twisted_private.missing()
    assert not gone, (f"Twisted {twisted_version.short()} dropped private names narsuite relies on: {gone}; "
                      "see narsuite/twisted_private.py")


def test_reactor_instance_attributes() -> None:
    from narsuite.reactor import NarsuiteEPollReactor

    r = NarsuiteEPollReactor()
    try:
        gone = [a for a in twisted_private.REACTOR_INSTANCE if not hasattr(r, a)]
        assert not gone, f"EPollReactor instances lack {gone}"
    finally:
        r._poller.close()


def test_check_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check fails with the missing name and the version, which is the point of having it."""
    monkeypatch.delattr(abstract.FileDescriptor, "_writeDisconnected")
    with pytest.raises(RuntimeError) as e:
        twisted_private.check()
    assert "twisted.internet.abstract.FileDescriptor._writeDisconnected" in str(e.value)
    assert twisted_version.short() in str(e.value)


def test_setup_cfg_bounds_twisted_to_checked_releases() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    reqs = [r.strip() for r in cfg["options"]["install_requires"].splitlines() if r.strip().startswith("twisted")]
    assert reqs and "<" in reqs[0], f"Twisted must have an upper bound in setup.cfg: {reqs}"
    upper = reqs[0].split("<")[1].strip()
    assert twisted_version.major < int(upper.split(".")[0]), (upper, twisted_version.short())
