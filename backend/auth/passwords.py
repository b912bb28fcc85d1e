"""Argon2id password hashes. Hashing is CPU-heavy: async callers run it in a thread."""

from __future__ import annotations

import asyncio
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()  # argon2id, library defaults (RFC 9106 low-memory profile)


@cache
def _dummy_hash() -> str:
    """Verified when the user does not exist, so an unknown email costs as much as a wrong
    password. Made on first use, not at import (hashing takes tens of milliseconds)."""
    return _hasher.hash("sightline-timing-equaliser")


MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024  # argon2 handles any length; this bounds the work per attempt


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_hasher.hash, password)


def _verify(stored: str | None, password: str) -> bool:
    try:
        return _hasher.verify(stored or _dummy_hash(), password) and stored is not None
    except (VerificationError, InvalidHashError):
        return False


async def verify_password(stored: str | None, password: str) -> bool:
    """True when `password` matches `stored`; a missing hash does the same work and fails."""
    if len(password) > MAX_PASSWORD_LENGTH:
        return False
    return await asyncio.to_thread(_verify, stored, password)
