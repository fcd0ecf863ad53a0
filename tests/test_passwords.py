"""narsuite.passwords: the shared home of password hashing (nar SOCKS5 auth, ike XAUTH).

The behaviour itself is tested through the nar role (tests/test_socks.py); here: the move
kept the old import path pointing at the very same objects, and the checker works for a
caller that is not the nar role (XAUTH encodes its str user names to bytes).
"""

from __future__ import annotations

import pytest
from twisted.internet import defer

import narsuite.nar.auth as nar_auth
import narsuite.passwords as passwords


def test_nar_auth_re_exports_the_shared_objects():
    for name in nar_auth.__all__:
        assert getattr(nar_auth, name) is getattr(passwords, name), name
    assert set(nar_auth.__all__) <= set(passwords.__all__)


def test_hash_verify_and_check_for_a_non_nar_caller():
    hashed = passwords.hash_password("wonderland", cost=4)
    passwords.check_hash_format(hashed)
    assert passwords.verify_password(hashed, b"wonderland")
    checker = passwords.PasswordChecker({"alice": hashed}, run=lambda f, *a: defer.maybeDeferred(f, *a))
    got = []
    checker.check(b"alice", b"wonderland").addCallback(got.append)
    checker.check(b"alice", b"wonderland").addCallback(got.append)  # the cache
    checker.check(b"mallory", b"wonderland").addCallback(got.append)  # dummy hash
    assert got == [True, True, False]
    assert checker.stats == {"verifications": 2, "cache_hits": 1, "failures": 1}


def test_length_limits_name_no_role():
    with pytest.raises(ValueError, match="1 to 255 bytes") as exc:
        passwords.hash_password("")
    assert "SOCKS" not in str(exc.value)
