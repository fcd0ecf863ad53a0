"""The IKEv2 responder under attack: unprotected error answers rate-limited (COOKIE not),
drops logged aggregated, SA owners volatile in the store.  Unit tests on a Clock."""

from __future__ import annotations

import secrets

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from narsuite.ike.config import IkeConfig
from narsuite.ike.role import ROLE
from narsuite.ike.v2 import constants as C
from narsuite.ike.v2 import wire
from narsuite.ike.v2.engine import IkeV2Engine
from narsuite.schema import build
from narsuite.store import MemoryBackend, Store


def engine(**ike):
    cfg = build(IkeConfig, {"address": "198.51.100.1", "peers": [{"name": "rw", "psk": "x" * 16}], **ike}, "ike")
    clock = Clock()
    clock.advance(1_000_000)
    store = Store(MemoryBackend(), clock)
    sent: list[tuple[bytes, tuple[str, int], int]] = []
    e = IkeV2Engine(cfg, store, clock, send=lambda d, a, p: sent.append((d, a, p)))
    return e, clock, sent


def sa_init_request() -> bytes:
    """An IKE_SA_INIT from a source no IKEv2 policy accepts (the only policy is IKEv1)."""
    return wire.build_message(wire.Header(secrets.token_bytes(8), bytes(8), C.IKE_SA_INIT, C.FLAG_INITIATOR, 0), [])


def test_unprotected_error_answers_are_rate_limited():
    e, clock, sent = engine(unauthenticated_notify_rate=10, unauthenticated_notify_burst=20)
    for i in range(300):
        e.received(sa_init_request(), (f"198.18.0.{i % 200 + 1}", 500), 500)
    assert e.counters["no_policy"] == 300 and len(sent) == 20 and e.counters["notify_rate_limited"] == 280
    clock.advance(1.0)
    for i in range(50):
        e.received(sa_init_request(), (f"198.18.1.{i + 1}", 500), 500)
    assert len(sent) == 30 and e.counters["notify_rate_limited"] == 320


def test_drops_cost_constant_log_lines():
    events: list[dict] = []
    obs = lambda ev: events.append(ev) if ev.get("log_namespace") == "narsuite.ike.v2.engine" else None  # noqa: E731
    globalLogPublisher.addObserver(obs)
    try:
        e, clock, _sent = engine()
        for i in range(5000):
            e.received(b"\x00" * 10 + bytes([i % 256]) * 30, ("198.18.2.1", 500), 500)  # malformed
        clock.advance(10)
    finally:
        globalLogPublisher.removeObserver(obs)
    assert e.counters["malformed"] == 5000
    assert len(events) <= 6 and events[-1]["counts"] == {"malformed": 5000}


def test_ike_sa_owners_are_volatile():
    e, _clock, _sent = engine()

    class _SA:
        name = "0123456789abcdef"

    owner = e.owner(_SA())  # type: ignore[arg-type]
    assert owner.startswith(tuple(ROLE.volatile_owners)) and not "ike:lease:rw:user:a".startswith(
        tuple(ROLE.volatile_owners))
