"""Anti-clogging: responder cookies that cost no state, and bounded half-open budgets.

RFC 2408 §2.5.3 gives the ISAKMP cookies an anti-clogging role: the responder's
cookie should be a keyed hash of the initiator's address and port, its cookie and
a time slot, so that a Main Mode first message (MM1) from a spoofed source costs
nothing but the answer.  Only when MM3 comes back carrying a cookie that verifies
has the initiator shown it receives our packets; only then is an SA created, a
half-open slot taken and Diffie-Hellman work done.  MM2 is a pure function of MM1
and the cookie, so a retransmitted MM1 gets the same MM2 within the slot (and a
valid, different one in the next slot, which an initiator still waiting takes).

One thing IKEv1 does not let us forget: HASH_I and HASH_R (RFC 2409 §5) cover
SAi_b, the body of MM1's SA payload, and MM3 does not repeat it.  So the
responder parks SAi_b (and what else MM1 decided) in :class:`FirstMessages`, a
memory bounded in entries and bytes that a flood can only push entries out of, in
arrival order: with capacity C and a flood of R first messages per second a real
initiator has C/R seconds to send MM3 (16,384 / 1,000 = 16 s; one round trip is
needed).  Nothing there is an SA: no timer, no DH value, no half-open slot.

Aggressive Mode cannot wait: its first answer carries our DH value and is
authenticated.  It gets its own :class:`HalfOpenBudget`, smaller than Main Mode's,
so a flood of AM1 cannot take the slots Main Mode clients need, and vice versa.

Everything here is pure: time comes from a clock (``seconds()``), randomness from
:mod:`secrets`; the engine decides what to do with the answers.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import struct
from collections import Counter, OrderedDict
from typing import Any

import attrs

__all__ = ["CookieJar", "FirstMessages", "ParkedFirst", "HalfOpenBudget"]

Address = tuple[str, int]


def _address_bytes(addr: Address) -> bytes:
    try:
        ip = socket.inet_pton(socket.AF_INET, addr[0])
    except OSError:
        ip = socket.inet_pton(socket.AF_INET6, addr[0])
    return ip + struct.pack("!H", addr[1])


class CookieJar:
    """Stateless responder cookies: HMAC-SHA256(secret, address, port, CKY-I, slot)[:8].

    The secret is fresh from :mod:`secrets` for every slot of ``slot_seconds``; the
    previous slot's secret is kept so that a cookie handed out just before a slot
    ends still verifies: a cookie is good for at least one slot and at most two.
    Secrets never leave this object and are never persisted: a restart only costs
    initiators in the middle of MM2-MM3 a retransmission.
    """

    def __init__(self, clock: Any, slot_seconds: float = 30.0) -> None:
        if slot_seconds <= 0:
            raise ValueError("slot_seconds must be > 0")
        self.clock = clock
        self.slot_seconds = slot_seconds
        self._secrets: dict[int, bytes] = {}
        self.rotations = 0

    def _slot(self) -> int:
        return int(self.clock.seconds() // self.slot_seconds)

    def _secret(self, slot: int) -> bytes | None:
        current = self._slot()
        if slot not in (current, current - 1):
            return None
        secret = self._secrets.get(slot)
        if secret is None and slot == current:
            secret = self._secrets[slot] = secrets.token_bytes(32)
            self.rotations += 1
            for old in [s for s in self._secrets if s < current - 1]:
                del self._secrets[old]
        return secret

    def _mac(self, secret: bytes, slot: int, addr: Address, icky: bytes) -> bytes:
        msg = _address_bytes(addr) + icky + struct.pack("!q", slot)
        mac = hmac.new(secret, msg, hashlib.sha256).digest()[:8]
        # A cookie is never all zero: zero means "no responder cookie yet" on the wire.
        return mac if any(mac) else b"\x00" * 7 + b"\x01"

    def cookie(self, addr: Address, icky: bytes) -> bytes:
        """Our CKY-R for a first message with CKY-I ``icky`` from ``addr``, in this slot."""
        slot = self._slot()
        secret = self._secret(slot)
        assert secret is not None
        return self._mac(secret, slot, addr, icky)

    def valid(self, addr: Address, icky: bytes, rcky: bytes) -> bool:
        """Did we hand out ``rcky`` to ``addr`` for ``icky``, in this slot or the last?"""
        current = self._slot()
        ok = False
        for slot in (current, current - 1):
            secret = self._secret(slot)
            if secret is not None:
                # compare_digest on every candidate: the time taken says nothing about which matched
                ok |= hmac.compare_digest(self._mac(secret, slot, addr, icky), rcky)
        return ok


@attrs.frozen
class ParkedFirst:
    """What MM1 decided and MM3 needs: the SA payload body the hashes cover, and choices."""

    sai_b: bytes
    #: whatever else the engine wants back (chosen proposal, candidates, NAT-T variant...)
    decided: Any = None
    local_port: int = 0

    @property
    def size(self) -> int:
        return len(self.sai_b) + 128  # the entry's own overhead, roughly


class FirstMessages:
    """A bounded memory of first messages answered statelessly, oldest pushed out first.

    Keyed by (CKY-I, CKY-R): the responder cookie already binds the source address,
    so an entry can only be claimed by someone who got our MM2.  ``max_entries`` and
    ``max_bytes`` bound it whatever arrives; ``evicted`` counts entries a newer one
    pushed out before their MM3 came (under a flood: raise ``max_entries``).
    """

    def __init__(self, max_entries: int = 16384, max_bytes: int = 16 * 1024 * 1024) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, ParkedFirst] = OrderedDict()
        self.bytes = 0
        self.parked = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def park(self, icky: bytes, rcky: bytes, entry: ParkedFirst) -> None:
        key = icky + rcky
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size
        self._entries[key] = entry
        self.bytes += entry.size
        self.parked += 1
        while self._entries and (len(self._entries) > self.max_entries or self.bytes > self.max_bytes):
            _k, gone = self._entries.popitem(last=False)
            self.bytes -= gone.size
            self.evicted += 1

    def take(self, icky: bytes, rcky: bytes) -> ParkedFirst | None:
        """The parked entry for these cookies, removed (an MM3 claims it once)."""
        entry = self._entries.pop(icky + rcky, None)
        if entry is not None:
            self.bytes -= entry.size
        return entry

    def peek(self, icky: bytes, rcky: bytes) -> ParkedFirst | None:
        return self._entries.get(icky + rcky)


class HalfOpenBudget:
    """Phase 1 exchanges in progress: at most ``per_source`` per address, ``total`` in all."""

    def __init__(self, total: int, per_source: int) -> None:
        self.total = total
        self.per_source = per_source
        self.by_source: Counter[str] = Counter()
        self.open = 0

    def refuse(self, ip: str) -> str | None:
        """Why a new exchange from ``ip`` may not start now, or None if it may."""
        if self.by_source[ip] >= self.per_source:
            return f"{ip} has {self.per_source} phase 1 exchanges open"
        if self.open >= self.total:
            return f"{self.total} phase 1 exchanges open in all"
        return None

    def take(self, ip: str) -> None:
        self.by_source[ip] += 1
        self.open += 1

    def give_back(self, ip: str) -> None:
        n = self.by_source[ip] - 1
        if n <= 0:
            del self.by_source[ip]
        else:
            self.by_source[ip] = n
        self.open = max(0, self.open - 1)
