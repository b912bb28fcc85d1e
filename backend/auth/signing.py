"""Access tokens: Ed25519-signed JWTs with a `kid`; keys in PostgreSQL, private halves encrypted.

Verification needs no database round trip: the public keys are cached in memory and reloaded
when a token names a `kid` the cache does not know (a replica that missed a rotation).
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import secrets
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, OKPKey
from joserfc.jwt import JWTClaimsRegistry
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.errors import InvalidToken
from backend.core.models import SigningKey

ALGORITHM = "Ed25519"
VERIFIED_CACHE_SIZE = 10_000  # RFC 9864's fully specified name for EdDSA over Ed25519


def _wrapping_key(secret_key: str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"sightline signing keys"
    ).derive(secret_key.encode())


def encrypt_private_key(pem: bytes, secret_key: str) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(_wrapping_key(secret_key)).encrypt(nonce, pem, b"signing-key")


def decrypt_private_key(blob: bytes, secret_key: str) -> bytes:
    return AESGCM(_wrapping_key(secret_key)).decrypt(blob[:12], blob[12:], b"signing-key")


@dataclass(frozen=True)
class TokenClaims:
    subject: uuid.UUID
    tenant_id: uuid.UUID
    role: str
    scopes: list[str]
    expires_at: float
    plan: str
    issued_at: float = 0.0
    session_id: uuid.UUID | None = None  # the refresh-token family (`sid`), when there is one


class TokenSigner:
    """Signs with the newest active key, verifies with every key not past its grace period."""

    def __init__(
        self,
        *,
        secret_key: str,
        issuer: str,
        audience: str,
        access_ttl_s: int,
        clock_skew_s: int,
        grace_s: int,
    ) -> None:
        self._secret_key = secret_key
        self.issuer = issuer
        self.audience = audience
        self.access_ttl_s = access_ttl_s
        self._skew = clock_skew_s
        self._grace = timedelta(seconds=grace_s)
        self._signing: OKPKey | None = None
        self._verifying = KeySet([])
        # Tokens already verified (a client reuses one for its whole lifetime): the signature
        # check costs ~0.2 ms, a lookup ~1 us. Expiry is still checked at every use.
        self._verified: OrderedDict[str, TokenClaims] = OrderedDict()
        self._reload_lock = asyncio.Lock()
        self._claims = JWTClaimsRegistry(
            # The clock with its fraction: `iat` carries milliseconds, and joserfc's default
            # whole-second clock put every new token "in the future" when the leeway is 0.
            now=time.time,  # type: ignore[arg-type]
            leeway=clock_skew_s,
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "value": audience},
            sub={"essential": True},
            exp={"essential": True},
            iat={"essential": True},
            tid={"essential": True},
        )

    async def load(self, session: AsyncSession) -> None:
        """Reads the keys; creates the first one when there is none."""
        rows = list(await session.scalars(select(SigningKey).order_by(SigningKey.created_at)))
        if not any(row.retired_at is None for row in rows):
            rows.append(await self.rotate(session))
        self._install(rows)

    async def rotate(self, session: AsyncSession) -> SigningKey:
        """A new signing key; the previous ones are retired (they keep verifying for a while)."""
        kid = f"{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(4)}"
        key = OKPKey.generate_key(
            "Ed25519", parameters={"kid": kid, "use": "sig", "alg": ALGORITHM}
        )
        await session.execute(
            update(SigningKey)
            .where(SigningKey.retired_at.is_(None))
            .values(retired_at=datetime.now(UTC))
        )
        row = SigningKey(
            kid=kid,
            alg=ALGORITHM,
            public_jwk=key.as_dict(private=False),
            private_key_encrypted=encrypt_private_key(key.as_pem(private=True), self._secret_key),
            created_at=datetime.now(UTC),
        )
        session.add(row)
        await session.flush()
        return row

    def _install(self, rows: list[SigningKey]) -> None:
        self._verified.clear()  # a key that left the verifying set must stop verifying
        now = datetime.now(UTC)
        active = [row for row in rows if row.retired_at is None]
        verifying = [
            OKPKey.import_key(row.public_jwk)
            for row in rows
            if row.retired_at is None or row.retired_at + self._grace > now
        ]
        newest = active[-1]
        pem = decrypt_private_key(newest.private_key_encrypted, self._secret_key)
        self._signing = OKPKey.import_key(pem, {"kid": newest.kid, "use": "sig", "alg": ALGORITHM})
        self._verifying = KeySet(verifying)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.as_dict(private=False) for key in self._verifying.keys]}

    def issue(
        self,
        *,
        user_id: uuid.UUID,
        tenant_id: uuid.UUID,
        role: str,
        scopes: list[str],
        plan: str,
        session_id: uuid.UUID | None = None,
    ) -> tuple[str, int]:
        """(token, lifetime in seconds)."""
        assert self._signing is not None, "signer not loaded"
        issued = time.time()
        now = int(issued)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": str(user_id),
            "tid": str(tenant_id),
            "role": role,
            "plan": plan,
            "scope": " ".join(sorted(scopes)),
            # A NumericDate may have a fraction (RFC 7519 section 2): a user's revocation at
            # second S.5 refuses a token issued at S.2 but not one issued at S.7.
            "iat": math.floor(issued * 1000) / 1000,
            "nbf": now,
            "exp": now + self.access_ttl_s,
            "jti": secrets.token_hex(8),
        }
        if session_id is not None:
            claims["sid"] = str(session_id)
        header = {"alg": ALGORITHM, "kid": self._signing.kid, "typ": "at+jwt"}
        return jwt.encode(header, claims, self._signing, algorithms=[ALGORITHM]), self.access_ttl_s

    def known_kid(self, token: str) -> bool:
        kid = _unverified_kid(token)
        return kid is not None and any(key.kid == kid for key in self._verifying.keys)

    def verify(self, token: str) -> TokenClaims:
        """Checks signature (Ed25519 only), kid, issuer, audience, exp, nbf, iat; or raises."""
        cached = self._verified.get(token)
        if cached is not None:
            if cached.expires_at + self._skew > time.time():
                self._verified.move_to_end(token)
                return cached
            del self._verified[token]
            raise InvalidToken("invalid token: expired")
        claims = self._verify_signed(token)
        self._verified[token] = claims
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return claims

    def _verify_signed(self, token: str) -> TokenClaims:
        if _unverified_kid(token) is None:
            raise InvalidToken("malformed token")
        try:
            decoded = jwt.decode(token, self._verifying, algorithms=[ALGORITHM])
            self._claims.validate(decoded.claims)
            claims = decoded.claims
            return TokenClaims(
                subject=uuid.UUID(claims["sub"]),
                tenant_id=uuid.UUID(claims["tid"]),
                role=str(claims.get("role", "")),
                scopes=str(claims.get("scope", "")).split(),
                expires_at=float(claims["exp"]),
                plan=str(claims.get("plan", "")),
                issued_at=float(claims["iat"]),
                session_id=uuid.UUID(str(claims["sid"])) if "sid" in claims else None,
            )
        except (JoseError, ValueError, KeyError, TypeError) as exc:
            raise InvalidToken(f"invalid token: {_reason(exc)}") from None

    async def refresh_if_unknown(self, token: str, session_factory: Any) -> None:
        """Reloads keys once when a token names a kid rotated in on another replica."""
        if self.known_kid(token) or _unverified_kid(token) is None:
            return
        async with self._reload_lock:
            if self.known_kid(token):
                return
            async with session_factory() as session:
                rows = list(
                    await session.scalars(select(SigningKey).order_by(SigningKey.created_at))
                )
            if rows:
                self._install(rows)


def _unverified_kid(token: str) -> str | None:
    import json

    try:
        head = token.split(".", 1)[0]
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    kid = header.get("kid") if isinstance(header, dict) else None
    return kid if isinstance(kid, str) else None


def _reason(exc: Exception) -> str:
    return getattr(exc, "error", None) or type(exc).__name__
