"""Attacks on access tokens: each one is refused with UNAUTHENTICATED."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid

import pytest
from httpx import AsyncClient
from joserfc import jwt
from joserfc.jwk import OKPKey

from backend.auth.signing import TokenSigner
from backend.services import Services
from tests.accounts import Account

ME = {"query": "{ me { userId } }"}


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(services: Services, account: Account, **overrides: object) -> dict:
    now = int(time.time())
    claims = {
        "iss": services.auth.signer.issuer,
        "aud": services.auth.signer.audience,
        "sub": str(account.user_id),
        "tid": str(account.tenant.id),
        "role": "owner",
        "scope": "admin",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
    }
    claims.update(overrides)
    return claims


def _signed(services: Services, claims: dict, **header: object) -> str:
    key = services.auth.signer._signing
    return jwt.encode(
        {"alg": "Ed25519", "kid": key.kid, **header}, claims, key, algorithms=["Ed25519"]
    )


async def _me(client: AsyncClient, token: str) -> dict:
    response = await client.post("/graphql", json=ME, headers={"authorization": f"Bearer {token}"})
    return response.json()


def _forged_cases(services: Services, account: Account) -> dict[str, str]:
    signer = services.auth.signer
    key = signer._signing
    claims = _claims(services, account)
    # The classic confusion attack, built by hand (joserfc itself refuses to make this key).
    signing_input = f"{_b64({'alg': 'HS256', 'kid': key.kid, 'typ': 'JWT'})}.{_b64(claims)}"
    mac = hmac.new(key.as_pem(private=False), signing_input.encode(), hashlib.sha256).digest()
    hs256 = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    valid = _signed(services, claims)
    head, body, sig = valid.split(".")
    other = OKPKey.generate_key("Ed25519", parameters={"kid": key.kid})
    return {
        "alg none": f"{_b64({'alg': 'none', 'kid': key.kid})}.{body}.",
        "HS256 signed with the public key": hs256,
        "expired": _signed(services, _claims(services, account, exp=int(time.time()) - 3600)),
        "not yet valid": _signed(services, _claims(services, account, nbf=int(time.time()) + 3600)),
        "wrong audience": _signed(services, _claims(services, account, aud="someone-else")),
        "wrong issuer": _signed(services, _claims(services, account, iss="https://evil")),
        "unknown kid": _signed(services, claims, kid="no-such-kid"),
        "tampered payload": f"{head}.{_b64({**claims, 'tid': str(uuid.uuid4())})}.{sig}",
        "signed by another key": jwt.encode(
            {"alg": "Ed25519", "kid": key.kid}, claims, other, algorithms=["Ed25519"]
        ),
        "garbage": "not.a.token",
        "missing tenant": _signed(services, {k: v for k, v in claims.items() if k != "tid"}),
    }


@pytest.mark.parametrize(
    "case",
    [
        "alg none",
        "HS256 signed with the public key",
        "expired",
        "not yet valid",
        "wrong audience",
        "wrong issuer",
        "unknown kid",
        "tampered payload",
        "signed by another key",
        "garbage",
        "missing tenant",
    ],
)
async def test_forged_or_invalid_tokens_are_refused(
    client: AsyncClient, owner: Account, services: Services, case: str
) -> None:
    token = _forged_cases(services, owner)[case]
    body = await _me(client, token)
    assert body["data"] is None
    assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED", (case, body)


async def test_a_valid_token_passes(
    client: AsyncClient, owner: Account, services: Services
) -> None:
    body = await _me(client, _signed(services, _claims(services, owner)))
    assert body["data"]["me"]["userId"] == str(owner.user_id)


async def test_rotation_keeps_old_tokens_valid_and_signs_with_the_new_key(
    client: AsyncClient, owner: Account, services: Services, app: object
) -> None:
    signer = services.auth.signer
    old_kid = signer._signing.kid
    async with app.state.sightline.db.session() as session:  # type: ignore[attr-defined]
        await signer.rotate(session)
        await signer.load(session)
    assert signer._signing.kid != old_kid
    assert (await _me(client, owner.access_token))["data"]["me"]  # old key still verifies
    kids = {k["kid"] for k in (await client.get("/.well-known/jwks.json")).json()["keys"]}
    assert {old_kid, signer._signing.kid} <= kids


def test_api_key_format_round_trips() -> None:
    from backend.auth.credentials import api_key_prefix, new_api_key

    for _ in range(500):  # secrets are URL-safe base64 and often contain "_"
        key, prefix = new_api_key()
        assert api_key_prefix(key) == prefix
    assert api_key_prefix("sl_zzzzzzzzzzzz_" + "a" * 43) is None
    assert api_key_prefix("sl_0123456789ab" + "a" * 44) is None


async def test_a_fresh_token_passes_with_no_clock_skew(services: Services, app: object) -> None:
    """`iat` carries milliseconds (revocation at S.5 must refuse a token of S.2): with no
    leeway it was compared to a whole-second clock and every new token was "issued in the
    future" for the rest of its second."""
    signer = services.auth.signer
    strict = TokenSigner(
        secret_key=signer_secret(app),
        issuer=signer.issuer,
        audience=signer.audience,
        access_ttl_s=60,
        clock_skew_s=0,
        grace_s=60,
    )
    async with app.state.sightline.db.session() as session:  # type: ignore[attr-defined]
        await strict.load(session)
    while time.time() % 1 > 0.8:  # leave the second room to verify within it
        await asyncio.sleep(0.05)
    token, _ = strict.issue(
        user_id=uuid.uuid4(), tenant_id=uuid.uuid4(), role="member", scopes=["chat"], plan="free"
    )
    assert strict.verify(token).scopes == ["chat"]


def signer_secret(app: object) -> str:
    settings = app.state.sightline.settings  # type: ignore[attr-defined]
    return settings.security.secret_key.get_secret_value()
