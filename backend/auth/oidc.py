"""Sign-in through an external OpenID Connect provider: authorization code flow with PKCE.

authlib's OpenID client does the protocol: discovery, the authorization URL with state, nonce and
the S256 code challenge, the code exchange, and the id_token (signature on the provider's keys,
refetched when a token names a new `kid`; issuer, audience, expiry, nonce).

What a started login must remember (nonce, PKCE verifier, `return_to`) lives in Redis for ten
minutes and is consumed once (GETDEL), so a callback works on any replica and cannot be replayed.
authlib's own state store is not used: it binds the state to a browser session cookie and reads
it before deleting it, so two racing callbacks could both pass.

A login is also bound to the browser that started it: `start` hands back a random binder that
the login endpoint sets as a cookie (its SHA-256 is stored with the login), and `finish` refuses
a callback that does not bring it. Without this, an attacker could start a login, stop at the
callback and send that link to a victim, whose browser would then sign in as the attacker
(login CSRF). The cookie's name carries a digest of the state, so two logins started in two tabs
do not overwrite each other.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from authlib.common.security import generate_token
from authlib.integrations.base_client import OAuthError as ProviderError
from authlib.integrations.starlette_client import OAuth, StarletteOAuth2App
from joserfc.errors import ClaimError, JoseError
from redis.asyncio import Redis

from backend.auth.errors import InvalidGrant, InvalidRequest
from backend.auth.principal import ExternalIdentity
from backend.config import AuthSettings
from backend.core.redis import KeySpace
from backend.errors import ServiceUnavailable

LOGIN_TTL_S = 600
DISCOVERY_TTL_S = 3600
HTTP_TIMEOUT_S = 10.0
# Asymmetric algorithms only: "none" and HMAC (keyed with the client secret) are refused.
ID_TOKEN_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "Ed25519", "EdDSA"]
# The id_token claim a check failed on, as the error names it.
_CLAIM_NAMES = {"iss": "issuer", "aud": "audience", "azp": "audience (azp)"}


# The cookie that binds a login to its browser: sent back only to the callback's path.
BINDING_COOKIE_PATH = "/oauth/oidc"


@dataclass(frozen=True, slots=True)
class StartedLogin:
    """Where to send the browser, and the cookie that must come back with the callback."""

    url: str
    cookie_name: str
    cookie_value: str


def binding_cookie_name(state: str) -> str:
    return f"sightline_oidc_{hashlib.sha256(state.encode()).hexdigest()[:16]}"


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class OIDCLogin:
    def __init__(self, settings: AuthSettings, redis: Redis, keys: KeySpace) -> None:
        if not (settings.oidc_issuer and settings.oidc_client_id and settings.oidc_redirect_url):
            raise ValueError("OIDC needs an issuer, a client id and a redirect URL")
        self._settings = settings
        self._issuer = settings.oidc_issuer.rstrip("/")
        self._redis = redis
        self._keys = keys.child("oidc")
        secret = settings.oidc_client_secret
        # authlib opens an HTTP client per call: they share one TLS context, loaded once here
        # rather than on the event loop at every sign-in.
        tls: ssl.SSLContext = httpx.create_ssl_context()
        self._provider: StarletteOAuth2App = OAuth().register(
            "sightline_oidc",
            client_id=settings.oidc_client_id,
            client_secret=secret.get_secret_value() if secret else None,
            server_metadata_url=f"{self._issuer}/.well-known/openid-configuration",
            client_kwargs={
                "scope": settings.oidc_scopes,
                "code_challenge_method": "S256",
                # The secret goes in the form, as before; a public client sends only its id.
                "token_endpoint_auth_method": "client_secret_post" if secret else "none",
                "timeout": HTTP_TIMEOUT_S,
                "follow_redirects": False,
                "verify": tls,
            },
        )

    @property
    def secure_cookies(self) -> bool:
        """Whether the binding cookie is Secure: when the callback is served over HTTPS."""
        return urlsplit(self._settings.oidc_redirect_url or "").scheme == "https"

    async def start(self, return_to: str | None) -> StartedLogin:
        """The provider URL to send the browser to, and the cookie binding the login to it."""
        if return_to is not None and not self._allowed_return(return_to):
            raise InvalidRequest("return_to is not an allowed origin")
        await self._discover()
        try:
            # The nonce is always asked for, whatever the configured scopes say.
            login = await self._provider.create_authorization_url(
                self._settings.oidc_redirect_url, nonce=generate_token(32)
            )
        except (httpx.HTTPError, RuntimeError) as exc:
            raise ServiceUnavailable(f"identity provider discovery failed: {exc}") from None
        binder = generate_token(43)
        await self._redis.set(
            self._keys("login", login["state"]),
            json.dumps(
                {
                    "nonce": login["nonce"],
                    "verifier": login["code_verifier"],
                    "return_to": return_to,
                    "binder": _digest(binder),
                }
            ),
            ex=LOGIN_TTL_S,
        )
        return StartedLogin(str(login["url"]), binding_cookie_name(login["state"]), binder)

    async def finish(self, code: str, state: str, binder: str | None) -> ExternalIdentity:
        """Exchanges the code and verifies the id_token; the login's state is consumed.
        `binder` is the binding cookie the browser sent back (None when it sent none)."""
        raw = await self._redis.getdel(self._keys("login", state))
        if raw is None:
            raise InvalidGrant("unknown or already used login state")
        login = json.loads(raw)
        if binder is None or not hmac.compare_digest(_digest(binder), str(login.get("binder"))):
            raise InvalidGrant("this sign-in was started in another browser")
        await self._discover()
        try:
            token = await self._provider.fetch_access_token(
                redirect_uri=self._settings.oidc_redirect_url,
                code=code,
                code_verifier=login["verifier"],
            )
        except (ProviderError, ValueError):  # an OAuth error, or an answer that is no token
            raise InvalidGrant("the identity provider refused the code") from None
        except httpx.HTTPStatusError as exc:  # a refusal that is not an OAuth error object
            if exc.response.status_code < 500:
                raise InvalidGrant("the identity provider refused the code") from None
            raise ServiceUnavailable("identity provider failed to exchange the code") from None
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(
                f"identity provider unreachable: {type(exc).__name__}"
            ) from None
        if not isinstance(token.get("id_token"), str):
            raise InvalidGrant("the identity provider sent no id_token")
        claims = await self._verify(token, login["nonce"])
        if claims.get("email_verified") is not True or not isinstance(claims.get("email"), str):
            raise InvalidGrant("the identity provider did not vouch for an email address")
        return ExternalIdentity(
            subject=str(claims["sub"]),
            email=claims["email"],
            name=str(claims.get("name") or ""),
            return_to=login.get("return_to"),
        )

    async def _verify(self, token: dict[str, Any], nonce: str) -> dict[str, Any]:
        client_id = self._settings.oidc_client_id
        try:
            claims = await self._provider.parse_id_token(
                token,
                nonce,
                claims_options={
                    "iss": {"essential": True, "values": [self._issuer, f"{self._issuer}/"]},
                    "aud": {"essential": True, "value": client_id},
                    "sub": {"essential": True},
                },
                leeway=self._settings.clock_skew_s,
            )
        except ClaimError as exc:
            raise InvalidGrant(
                f"invalid id_token: {_CLAIM_NAMES.get(exc.claim, exc.claim)}"
            ) from None
        except (JoseError, ValueError) as exc:
            raise InvalidGrant(
                f"invalid id_token: {getattr(exc, 'error', type(exc).__name__)}"
            ) from None
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(
                f"identity provider keys unavailable: {type(exc).__name__}"
            ) from None
        return dict(claims)

    async def _discover(self) -> None:
        """The provider's discovery document (and with it the keys), refreshed hourly; one that
        names another issuer is refused."""
        metadata = self._provider.server_metadata
        loaded_at = metadata.get("_loaded_at")
        if loaded_at is not None and time.time() - loaded_at >= DISCOVERY_TTL_S:
            metadata.clear()  # authlib loads it once: drop it (and the cached keys) to refetch
        try:
            metadata = await self._provider.load_server_metadata()
        except (httpx.HTTPError, ValueError, TypeError) as exc:
            metadata.clear()
            raise ServiceUnavailable(f"identity provider discovery failed: {exc}") from None
        if str(metadata.get("issuer", "")).rstrip("/") != self._issuer:
            metadata.clear()
            raise ServiceUnavailable("identity provider's discovery names another issuer")
        if not all(
            isinstance(metadata.get(name), str)
            for name in ("authorization_endpoint", "token_endpoint", "jwks_uri")
        ):
            metadata.clear()
            raise ServiceUnavailable("identity provider discovery failed: endpoints missing")
        # authlib accepts what the provider advertises; only asymmetric algorithms are kept.
        advertised = metadata.get("id_token_signing_alg_values_supported") or ["RS256"]
        metadata["id_token_signing_alg_values_supported"] = [
            alg for alg in advertised if alg in ID_TOKEN_ALGORITHMS
        ] or ["RS256"]

    def _allowed_return(self, url: str) -> bool:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        return parts.scheme in {"http", "https"} and origin in self._settings.oidc_return_origins
