"""Anti-clogging pieces (narsuite.ike.cookies) and the token bucket, on a Clock."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from narsuite.ike.cookies import CookieJar, FirstMessages, HalfOpenBudget, ParkedFirst
from narsuite.ratelimit import TokenBucket

A = ("192.0.2.10", 500)
ICKY = bytes.fromhex("0102030405060708")


def test_cookie_is_stable_within_a_slot_and_bound_to_address_port_and_icky() -> None:
    clock = Clock()
    jar = CookieJar(clock, slot_seconds=30)
    c = jar.cookie(A, ICKY)
    assert len(c) == 8 and any(c)
    clock.advance(10)
    assert jar.cookie(A, ICKY) == c  # a retransmitted MM1 gets the same cookie (and MM2)
    assert jar.valid(A, ICKY, c)
    assert not jar.valid(("192.0.2.11", 500), ICKY, c)
    assert not jar.valid(("192.0.2.10", 4500), ICKY, c)
    assert not jar.valid(A, bytes(8), c)
    assert jar.cookie(("192.0.2.11", 500), ICKY) != c


def test_cookie_lives_one_to_two_slots_then_is_refused() -> None:
    clock = Clock()
    clock.advance(29.9)
    jar = CookieJar(clock, slot_seconds=30)
    c = jar.cookie(A, ICKY)  # made at the very end of slot 0
    clock.advance(0.2)
    assert jar.valid(A, ICKY, c)  # slot 1: still good
    assert jar.cookie(A, ICKY) != c  # a new slot, a new secret
    clock.advance(30)
    assert not jar.valid(A, ICKY, c)  # slot 2: expired


def test_secrets_are_per_jar_and_old_ones_are_forgotten() -> None:
    clock = Clock()
    j1, j2 = CookieJar(clock), CookieJar(clock)
    assert j1.cookie(A, ICKY) != j2.cookie(A, ICKY)
    for _ in range(10):
        clock.advance(30)
        j1.cookie(A, ICKY)
    assert len(j1._secrets) <= 2 and j1.rotations == 11


def test_forged_cookie_is_refused() -> None:
    jar = CookieJar(Clock())
    real = jar.cookie(A, ICKY)
    forged = bytes([real[0] ^ 1]) + real[1:]
    assert not jar.valid(A, ICKY, forged)


def test_first_messages_bounded_in_entries_and_bytes_oldest_out() -> None:
    fm = FirstMessages(max_entries=3, max_bytes=10_000)
    for i in range(5):
        fm.park(bytes([i]) * 8, b"r" * 8, ParkedFirst(b"s" * 100, decided=i))
    assert len(fm) == 3 and fm.evicted == 2
    assert fm.take(b"\x00" * 8, b"r" * 8) is None  # pushed out first
    got = fm.take(b"\x04" * 8, b"r" * 8)
    assert got is not None and got.decided == 4
    assert fm.take(b"\x04" * 8, b"r" * 8) is None  # claimed once
    big = FirstMessages(max_entries=1000, max_bytes=1_000)
    for i in range(10):
        big.park(bytes([i]) * 8, b"r" * 8, ParkedFirst(b"s" * 300))
    assert big.bytes <= 1_000 and len(big) == 2


def test_flood_leaves_a_real_initiator_its_round_trip() -> None:
    """1,000 spoofed MM1 per second for 5 s on a 16,384-entry memory: an MM1 parked at
    the start is still there for its MM3."""
    fm = FirstMessages()
    fm.park(b"real-ini", b"cookie-r", ParkedFirst(b"sa"))
    for i in range(5_000):
        fm.park(i.to_bytes(8, "big"), b"spoofed!", ParkedFirst(b"x" * 300))
    assert fm.take(b"real-ini", b"cookie-r") is not None


def test_half_open_budget_per_source_and_total() -> None:
    b = HalfOpenBudget(total=3, per_source=2)
    assert b.refuse("a") is None
    b.take("a")
    b.take("a")
    assert b.refuse("a") == "a has 2 phase 1 exchanges open"
    b.take("b")
    assert b.refuse("c") == "3 phase 1 exchanges open in all"
    b.give_back("a")
    assert b.refuse("c") is None and b.by_source == {"a": 1, "b": 1}
    b.give_back("b")
    assert "b" not in b.by_source and b.open == 1


def test_token_bucket_burst_then_rate_and_counts() -> None:
    clock = Clock()
    tb = TokenBucket(rate=10, burst=5, clock=clock)
    assert [tb.take() for _ in range(7)] == [True] * 5 + [False] * 2
    clock.advance(0.25)  # 2.5 tokens
    assert [tb.take() for _ in range(3)] == [True, True, False]
    clock.advance(100)
    assert sum(tb.take() for _ in range(100)) == 5  # never more than the burst saved up
    assert tb.allowed == 12 and tb.refused == 98
    assert not TokenBucket(0, 0, clock).take()
    with pytest.raises(ValueError):
        TokenBucket(-1, 1, clock)
