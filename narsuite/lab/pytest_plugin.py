"""Pytest fixtures for the network lab.

Load it from ``tests/conftest.py``::

    pytest_plugins = ["narsuite.lab.pytest_plugin"]

or ad hoc with ``-p narsuite.lab.pytest_plugin``.

Fixtures (function scope, always torn down): ``lab`` (a fresh
:class:`~narsuite.lab.Lab`), ``nar_topo``, ``ra_topo`` and ``mip_topo``
(the topologies of :mod:`narsuite.lab.topologies`, built in that lab).

When the lab cannot work here (not root, no ``ip netns``...) the fixtures
skip the test, unless ``NARSUITE_REQUIRE_LAB=1`` is set: then they fail it,
so that CI never skips lab tests silently.  Tests using these fixtures get
the ``lab`` marker automatically (``-m "not lab"`` deselects them).
"""

from __future__ import annotations

import os
import shutil

import pytest

from .netns import Lab, LabError, lab_unavailable_reason, scripts_on_path
from .strongswan import strongswan_unavailable_reason
from .topologies import mip_topology, nar_topology, remote_access_topology

LAB_FIXTURES = frozenset({"lab", "nar_topo", "ra_topo", "mip_topo"})
REQUIRE_ENV = "NARSUITE_REQUIRE_LAB"


def lab_required() -> bool:
    """``NARSUITE_REQUIRE_LAB`` is set to a true value (1, true, yes; "0" or empty is false).

    The one place that reads the variable: every test that would otherwise skip calls
    :func:`unavailable` (or :func:`need_tools`), so CI never counts a skip as a pass.
    """
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def unavailable(reason: str, what: str = "network lab") -> None:
    """Skip the running test for ``reason``; fail it instead under ``NARSUITE_REQUIRE_LAB=1``."""
    if lab_required():
        pytest.fail(f"{what} unavailable ({REQUIRE_ENV}=1): {reason}", pytrace=False)
    pytest.skip(f"{what} unavailable: {reason}")


_unavailable = unavailable


def need_tools(*tools: str) -> None:
    """Every command in ``tools`` is on PATH; else :func:`unavailable` (scripts/setup.sh installs them)."""
    gone = [t for t in tools if shutil.which(t) is None]
    if gone:
        unavailable(f"{', '.join(gone)} not on PATH (scripts/setup.sh installs it)", "tool")


def need_module(name: str) -> None:
    """The Python module ``name`` imports; else :func:`unavailable` (the test extra installs it)."""
    try:
        __import__(name)
    except ImportError as e:
        unavailable(f"Python module {name} missing ({e}); pip install -e '.[test]'", "module")


def pytest_configure(config):
    # (tests that run console scripts without a Lab need them on PATH too)
    scripts_on_path()
    config.addinivalue_line(
        "markers", "lab: needs root, network namespaces and nftables (the network lab)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if LAB_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.lab)


@pytest.fixture
def lab():
    """A fresh Lab, closed after the test whatever happens."""
    reason = lab_unavailable_reason()
    if reason:
        _unavailable(reason)
    try:
        the_lab = Lab()
    except (LabError, OSError) as exc:
        _unavailable(f"cannot create a lab: {exc}")
    try:
        yield the_lab
    finally:
        the_lab.close()


@pytest.fixture
def nar_topo(lab):
    """X -- N -- Y (see narsuite.lab.topologies.nar_topology)."""
    return nar_topology(lab)


@pytest.fixture
def ra_topo(lab):
    """R1/R3 behind NAT1, R2 behind NAT2, gateway G, internal host H."""
    return remote_access_topology(lab)


@pytest.fixture
def mip_topo(lab):
    """MN -- NAT -- MIPP -- {HA, CN}."""
    return mip_topology(lab)


@pytest.fixture
def need_strongswan():
    """strongSwan (charon, swanctl) is installed: skip otherwise, fail under NARSUITE_REQUIRE_LAB=1."""
    reason = strongswan_unavailable_reason()
    if reason:
        unavailable(reason, "strongSwan")


@pytest.fixture
def need_libreswan():
    """Libreswan's pluto (unpacked by scripts/setup.sh): skip otherwise, fail under NARSUITE_REQUIRE_LAB=1."""
    from .libreswan import libreswan_unavailable_reason

    reason = libreswan_unavailable_reason()
    if reason:
        unavailable(reason, "Libreswan")
