"""Sign-in through an external OpenID Connect provider: authorization code flow with PKCE.

State, nonce and the PKCE verifier of a started login live in Redis for ten minutes and are
consumed once, so a callback works on any replica and cannot be replayed. The provider's
discovery document and keys are cached; keys are refetched when an id_token names a new `kid`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from redis.asyncio import Redis

from backend.auth.errors import InvalidGrant, InvalidRequest
from backend.config import AuthSettings
from backend.core.redis import KeySpace
from backend.errors import ServiceUnavailable

LOGIN_TTL_S = 600
DISCOVERY_TTL_S = 3600
# Asymmetric algorithms only: "none" and HMAC (keyed with the client secret) are refused.
ID_TOKEN_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "Ed25519", "EdDSA"]


@dataclass(frozen=True)
class ExternalIdentity:
    subject: str
    email: str
    name: str
    return_to: str | None


@dataclass
class _Provider:
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    keys: KeySet
    fetched_at: float


class OIDCLogin:
    def __init__(
        self, settings: AuthSettings, redis: Redis, keys: KeySpace, http: httpx.AsyncClient
    ) -> None:
        if not (settings.oidc_issuer and settings.oidc_client_id and settings.oidc_redirect_url):
            raise ValueError("OIDC needs an issuer, a client id and a redirect URL")
        self._settings = settings
        self._issuer = settings.oidc_issuer.rstrip("/")
        self._redis = redis
        self._keys = keys.child("oidc")
        self._http = http
        self._provider: _Provider | None = None

    async def start(self, return_to: str | None) -> str:
        """The provider URL to send the browser to."""
        if return_to is not None and not self._allowed_return(return_to):
            raise InvalidRequest("return_to is not an allowed origin")
        provider = await self._discover()
        state, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        verifier = secrets.token_urlsafe(48)
        await self._redis.set(
            self._keys("login", state),
            json.dumps({"nonce": nonce, "verifier": verifier, "return_to": return_to}),
            ex=LOGIN_TTL_S,
        )
        challenge = (
            base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            .rstrip(b"=")
            .decode()
        )
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self._settings.oidc_client_id,
                "redirect_uri": self._settings.oidc_redirect_url,
                "scope": self._settings.oidc_scopes,
                "state": state,
                "nonce": nonce,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        return f"{provider.authorization_endpoint}?{query}"

    async def finish(self, code: str, state: str) -> ExternalIdentity:
        """Exchanges the code and verifies the id_token; the login's state is consumed."""
        raw = await self._redis.getdel(self._keys("login", state))
        if raw is None:
            raise InvalidGrant("unknown or already used login state")
        login = json.loads(raw)
        provider = await self._discover()
        secret = self._settings.oidc_client_secret
        try:
            response = await self._http.post(
                provider.token_endpoint,
                data={
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": self._settings.oidc_redirect_url,
                    "client_id": self._settings.oidc_client_id,
                    "client_secret": secret.get_secret_value() if secret else "",
                    "code_verifier": login["verifier"],
                },
            )
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(
                f"identity provider unreachable: {type(exc).__name__}"
            ) from None
        if response.status_code != 200:
            raise InvalidGrant("the identity provider refused the code")
        id_token = response.json().get("id_token")
        if not isinstance(id_token, str):
            raise InvalidGrant("the identity provider sent no id_token")
        claims = await self._verify(id_token, provider, login["nonce"])
        if claims.get("email_verified") is not True or not isinstance(claims.get("email"), str):
            raise InvalidGrant("the identity provider did not vouch for an email address")
        return ExternalIdentity(
            subject=str(claims["sub"]),
            email=claims["email"],
            name=str(claims.get("name") or ""),
            return_to=login.get("return_to"),
        )

    async def _verify(self, id_token: str, provider: _Provider, nonce: str) -> dict[str, Any]:
        try:
            try:
                decoded = jwt.decode(id_token, provider.keys, algorithms=ID_TOKEN_ALGORITHMS)
            except JoseError:
                provider.keys = await self._fetch_keys(provider.jwks_uri)  # rotated at the IdP?
                decoded = jwt.decode(id_token, provider.keys, algorithms=ID_TOKEN_ALGORITHMS)
        except (JoseError, ValueError) as exc:
            raise InvalidGrant(
                f"invalid id_token: {getattr(exc, 'error', type(exc).__name__)}"
            ) from None
        claims = decoded.claims
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        now = time.time()
        skew = self._settings.clock_skew_s
        problems = [
            (str(claims.get("iss", "")).rstrip("/") != self._issuer, "issuer"),
            (self._settings.oidc_client_id not in audiences, "audience"),
            (not isinstance(claims.get("exp"), int | float) or claims["exp"] + skew < now, "exp"),
            (isinstance(claims.get("iat"), int | float) and claims["iat"] - skew > now, "iat"),
            (claims.get("nonce") != nonce, "nonce"),
            (not claims.get("sub"), "sub"),
        ]
        for failed, what in problems:
            if failed:
                raise InvalidGrant(f"invalid id_token: {what}")
        return claims

    async def _discover(self) -> _Provider:
        provider = self._provider
        if provider is not None and time.time() - provider.fetched_at < DISCOVERY_TTL_S:
            return provider
        try:
            response = await self._http.get(f"{self._issuer}/.well-known/openid-configuration")
            response.raise_for_status()
            document = response.json()
            if str(document.get("issuer", "")).rstrip("/") != self._issuer:
                raise ServiceUnavailable("identity provider's discovery names another issuer")
            provider = _Provider(
                authorization_endpoint=document["authorization_endpoint"],
                token_endpoint=document["token_endpoint"],
                jwks_uri=document["jwks_uri"],
                keys=await self._fetch_keys(document["jwks_uri"]),
                fetched_at=time.time(),
            )
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            raise ServiceUnavailable(f"identity provider discovery failed: {exc}") from None
        self._provider = provider
        return provider

    async def _fetch_keys(self, jwks_uri: str) -> KeySet:
        response = await self._http.get(jwks_uri)
        response.raise_for_status()
        return KeySet.import_key_set(response.json())

    def _allowed_return(self, url: str) -> bool:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        return parts.scheme in {"http", "https"} and origin in self._settings.oidc_return_origins
