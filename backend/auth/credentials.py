"""Opaque credentials (API keys, refresh tokens, client secrets): format, generation, digest.

They carry 256 bits of randomness, so a fast digest (SHA-256) is enough to store them: there is
nothing to brute-force, unlike a password.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

API_KEY_PREFIX = "sl_"
REFRESH_TOKEN_PREFIX = "slr_"  # noqa: S105 (a format marker)
CLIENT_ID_PREFIX = "slc_"
CLIENT_SECRET_PREFIX = "slcs_"  # noqa: S105 (a format marker)

_ID_CHARS = 12  # the public part of an API key: unique, shown in listings


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def matches(secret: str, stored: bytes) -> bool:
    return hmac.compare_digest(digest(secret), stored)


def new_api_key() -> tuple[str, str]:
    """(full key, public prefix): `sl_<id>_<secret>`; the prefix finds the row."""
    key_id = secrets.token_hex(_ID_CHARS // 2)
    prefix = f"{API_KEY_PREFIX}{key_id}"
    return f"{prefix}_{secrets.token_urlsafe(32)}", prefix


def api_key_prefix(key: str) -> str | None:
    """The prefix of a well-formed API key, else None."""
    # Split by position: the secret part is URL-safe base64 and may itself contain "_".
    cut = len(API_KEY_PREFIX) + _ID_CHARS
    head, sep, secret = key[:cut], key[cut : cut + 1], key[cut + 1 :]
    if not key.startswith(API_KEY_PREFIX) or sep != "_" or len(secret) < 32:
        return None
    if any(c not in "0123456789abcdef" for c in head[len(API_KEY_PREFIX) :]):
        return None
    return head


def new_refresh_token() -> str:
    return REFRESH_TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_client() -> tuple[str, str]:
    return CLIENT_ID_PREFIX + secrets.token_hex(8), CLIENT_SECRET_PREFIX + secrets.token_urlsafe(32)
