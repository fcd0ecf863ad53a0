"""Username/password checking for SOCKS5 (RFC 1929): the shared :mod:`narsuite.passwords`.

The hashing and the cached, threaded checker used to live here; the ike role's XAUTH needs
the same thing, so they moved to :mod:`narsuite.passwords` (neither role imports the other).
This module keeps the old import path working for the nar role, its tests and the
``etc/nar.toml`` recipe (``from narsuite.nar.auth import hash_password``).
"""

from __future__ import annotations

from narsuite.passwords import (
    BCRYPT_COST,
    SCRYPT_LN,
    PasswordChecker,
    check_hash_format,
    hash_password,
    verify_password,
)

__all__ = ["hash_password", "verify_password", "check_hash_format", "PasswordChecker",
           "BCRYPT_COST", "SCRYPT_LN"]
