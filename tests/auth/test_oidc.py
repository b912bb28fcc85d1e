"""Sign-in through an external OpenID Connect provider: a real provider stub on a real port."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse
from starlette.routing import Route

from backend.app import create_app
from backend.auth import oidc
from backend.config import AuthSettings, Settings
from backend.core.db import Database
from tests.conftest import free_port, lifespan, serve_asgi

CLIENT_ID, CLIENT_SECRET = "sightline-test", "provider-secret"


class Provider:
    """A minimal OpenID provider: discovery, JWKS, authorize (auto-consent), token."""

    def __init__(self, port: int) -> None:
        self.issuer = f"http://127.0.0.1:{port}"
        self.key = RSAKey.generate_key(2048, parameters={"kid": "idp-1", "alg": "RS256"})
        self.codes: dict[str, dict[str, Any]] = {}
        self.claims_override: dict[str, Any] = {}
        self.email = "ada@lovelace.example"
        self.discoveries = 0
        self.discovered_issuer: str | None = None  # what discovery names, when not the issuer
        self.app = Starlette(
            routes=[
                Route("/.well-known/openid-configuration", self.discovery),
                Route("/jwks", self.jwks),
                Route("/authorize", self.authorize),
                Route("/token", self.token, methods=["POST"]),
            ]
        )

    async def discovery(self, _: Request) -> JSONResponse:
        self.discoveries += 1
        return JSONResponse(
            {
                "issuer": self.discovered_issuer or self.issuer,
                "authorization_endpoint": f"{self.issuer}/authorize",
                "token_endpoint": f"{self.issuer}/token",
                "jwks_uri": f"{self.issuer}/jwks",
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        )

    async def jwks(self, _: Request) -> JSONResponse:
        return JSONResponse({"keys": [self.key.as_dict(private=False)]})

    async def authorize(self, request: Request) -> RedirectResponse:
        q = request.query_params
        assert q["client_id"] == CLIENT_ID
        assert q["code_challenge_method"] == "S256"
        code = secrets.token_urlsafe(16)
        self.codes[code] = dict(q)
        return RedirectResponse(f"{q['redirect_uri']}?code={code}&state={q['state']}", 302)

    async def token(self, request: Request) -> JSONResponse:
        form = await request.form()
        login = self.codes.pop(str(form["code"]), None)
        verifier = str(form.get("code_verifier", ""))
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        if (
            login is None
            or form["client_secret"] != CLIENT_SECRET
            or challenge.rstrip(b"=").decode() != login["code_challenge"]
        ):
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": CLIENT_ID,
            "sub": "idp-user-1",
            "email": self.email,
            "email_verified": True,
            "name": "Ada",
            "nonce": login["nonce"],
            "iat": now,
            "exp": now + 300,
            **self.claims_override,
        }
        id_token = jwt.encode({"alg": "RS256", "kid": self.key.kid}, claims, self.key)
        return JSONResponse({"id_token": id_token, "access_token": "x", "token_type": "Bearer"})


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    # The provider must know its own URL (the issuer) before it serves.
    port = free_port()
    stub = Provider(port)
    async with serve_asgi(stub.app, port):
        yield stub


@pytest.fixture
async def oidc_client(
    settings: Settings, db: Database, redis: Redis, provider: Provider
) -> AsyncIterator[httpx.AsyncClient]:
    async with db.session() as session:
        from backend.core.models import Tenant

        slug = f"sso-{secrets.token_hex(4)}"
        session.add(Tenant(slug=slug, name="SSO"))
    settings.auth = AuthSettings(
        oidc_issuer=provider.issuer,
        oidc_client_id=CLIENT_ID,
        oidc_client_secret=CLIENT_SECRET,
        oidc_redirect_url="http://sightline.test/oauth/oidc/callback",
        oidc_tenant=slug,
        oidc_return_origins=["http://app.example"],
    )
    application = create_app(settings, db=db, redis=redis)
    async with (
        lifespan(application) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://sightline.test"
        ) as client,
    ):
        yield client


async def _through_provider(
    client: httpx.AsyncClient, return_to: str | None = None
) -> httpx.Response:
    params = {"return_to": return_to} if return_to else {}
    start = await client.get("/oauth/oidc/login", params=params)
    assert start.status_code == 302
    async with httpx.AsyncClient() as browser:
        consent = await browser.get(start.headers["location"])
    assert consent.status_code == 302
    callback = urlsplit(consent.headers["location"])
    return await client.get("/oauth/oidc/callback", params=parse_qs(callback.query))


async def test_sign_in_creates_the_user_and_issues_tokens(oidc_client: httpx.AsyncClient) -> None:
    response = await _through_provider(oidc_client)
    assert response.status_code == 200, response.text
    tokens = response.json()
    me = await oidc_client.post(
        "/graphql",
        json={"query": "{ me { role } }"},
        headers={"authorization": f"Bearer {tokens['access_token']}"},
    )
    assert me.json()["data"]["me"]["role"] == "MEMBER"
    again = await _through_provider(oidc_client)  # the same user signs in again
    assert again.status_code == 200


async def test_return_to_gets_the_tokens_in_the_fragment(oidc_client: httpx.AsyncClient) -> None:
    response = await _through_provider(oidc_client, "http://app.example/signed-in")
    assert response.status_code == 303
    location = response.headers["location"]
    assert location.startswith("http://app.example/signed-in#access_token=")
    refused = await oidc_client.get(
        "/oauth/oidc/login", params={"return_to": "http://evil.example"}
    )
    assert refused.json()["error"] == "invalid_request"


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"nonce": "replayed"}, "nonce"),
        ({"aud": "another-client"}, "audience"),
        ({"iss": "http://evil.example"}, "issuer"),
        ({"exp": 1000}, "exp"),
        ({"email_verified": False}, "email"),
    ],
)
async def test_bad_id_tokens_are_refused(
    oidc_client: httpx.AsyncClient, provider: Provider, override: dict[str, Any], reason: str
) -> None:
    provider.claims_override = override
    response = await _through_provider(oidc_client)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    assert reason in response.json()["error_description"]


async def test_a_callback_cannot_be_replayed(
    oidc_client: httpx.AsyncClient, provider: Provider
) -> None:
    start = await oidc_client.get("/oauth/oidc/login")
    async with httpx.AsyncClient() as browser:
        consent = await browser.get(start.headers["location"])
    params = parse_qs(urlsplit(consent.headers["location"]).query)
    assert (await oidc_client.get("/oauth/oidc/callback", params=params)).status_code == 200
    replay = await oidc_client.get("/oauth/oidc/callback", params=params)
    assert replay.json()["error"] == "invalid_grant"


async def test_a_login_finishes_only_in_the_browser_that_started_it(
    oidc_client: httpx.AsyncClient,
) -> None:
    """Login CSRF: a callback link from a login someone else started signs nobody in, even in
    a browser that has a login of its own under way."""
    attacker = await oidc_client.get("/oauth/oidc/login")
    cookie = attacker.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=lax" in cookie
    assert "path=/oauth/oidc" in cookie
    assert "secure" not in cookie  # the test callback URL is plain http
    async with httpx.AsyncClient() as browser:
        consent = await browser.get(attacker.headers["location"])
    link = parse_qs(urlsplit(consent.headers["location"]).query)
    oidc_client.cookies.clear()  # the victim's browser: it never started that login
    assert (await oidc_client.get("/oauth/oidc/login")).status_code == 302  # but one of its own
    refused = await oidc_client.get("/oauth/oidc/callback", params=link)
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_grant"
    assert "another browser" in refused.json()["error_description"]
    assert (await _through_provider(oidc_client)).status_code == 200  # its own sign-in works


async def test_without_a_provider_the_endpoints_are_404(client: httpx.AsyncClient) -> None:
    assert (await client.get("/oauth/oidc/login")).status_code == 404


async def test_keys_rotated_at_the_provider_are_fetched_again(
    oidc_client: httpx.AsyncClient, provider: Provider
) -> None:
    assert (await _through_provider(oidc_client)).status_code == 200
    provider.key = RSAKey.generate_key(2048, parameters={"kid": "idp-2", "alg": "RS256"})
    assert (await _through_provider(oidc_client)).status_code == 200  # a kid not seen before


async def test_discovery_is_cached_and_then_refreshed(
    oidc_client: httpx.AsyncClient, provider: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(2):
        assert (await _through_provider(oidc_client)).status_code == 200
    assert provider.discoveries == 1
    monkeypatch.setattr(oidc, "DISCOVERY_TTL_S", 0)
    assert (await _through_provider(oidc_client)).status_code == 200
    assert provider.discoveries == 3  # once at the login, once at the callback


async def test_a_discovery_that_names_another_issuer_is_refused(
    oidc_client: httpx.AsyncClient, provider: Provider
) -> None:
    provider.discovered_issuer = "http://evil.example"
    response = await oidc_client.get("/oauth/oidc/login")
    assert response.status_code == 503
    assert response.json()["error"] == "temporarily_unavailable"
    assert "another issuer" in response.json()["error_description"]
