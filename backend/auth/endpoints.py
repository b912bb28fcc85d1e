"""REST endpoints of OAuth 2.0: the token endpoint (RFC 6749), revocation (RFC 7009), JWKS."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from backend.auth.errors import InvalidGrant, InvalidRequest, OAuthError, UnsupportedGrantType
from backend.auth.oidc import (
    BINDING_COOKIE_PATH,
    LOGIN_TTL_S,
    OIDCLogin,
    binding_cookie_name,
)
from backend.auth.service import AuthService, require_request_field
from backend.core.untrusted import unstorable_text
from backend.errors import NotFound, RateLimited, ServiceUnavailable, expected_error

log = logging.getLogger(__name__)

FormField = Annotated[str | None, Form()]

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _oauth_error(exc: OAuthError) -> JSONResponse:
    return JSONResponse(
        {"error": exc.error, "error_description": exc.message},
        status_code=exc.status,
        headers=_NO_STORE,
    )


def _require_storable(**fields: str | None) -> None:
    """Form fields reach PostgreSQL (tenant, user name, client id): one it cannot store (a
    NUL) is an invalid request, not a database error."""
    for name, value in fields.items():
        if value and (problem := unstorable_text(value)):
            raise InvalidRequest(f"{name} {problem}")


def _token_error(exc: Exception) -> JSONResponse:
    """The token endpoint's answer to a refused grant, a throttled sign-in or an outage."""
    if isinstance(exc, OAuthError):
        return _oauth_error(exc)
    if isinstance(exc, RateLimited):
        return JSONResponse(
            {
                "error": "slow_down",
                "error_description": exc.message,
                "retry_after": exc.retry_after_s,
            },
            status_code=429,
            headers={**_NO_STORE, "Retry-After": str(max(1, math.ceil(exc.retry_after_s)))},
        )
    return _unavailable(exc)


def _unavailable(exc: Exception) -> JSONResponse:
    """PostgreSQL or Redis down: 503 `temporarily_unavailable` (the OAuth error name for it) with
    Retry-After; anything else is re-raised (a bug, answered 500 by the app)."""
    typed = expected_error(exc)
    if not isinstance(typed, ServiceUnavailable):
        raise exc
    log.warning("answered 503 temporarily_unavailable: %s: %s", type(exc).__name__, exc)
    return JSONResponse(
        {"error": "temporarily_unavailable", "error_description": typed.message},
        status_code=503,
        headers={**_NO_STORE, "Retry-After": "1"},
    )


def oauth_router(
    auth_of: Callable[[Request], AuthService],
    oidc_of: Callable[[Request], OIDCLogin | None],
) -> APIRouter:
    router = APIRouter(tags=["oauth"])

    @router.post("/oauth/token")
    async def token(  # noqa: PLR0917 (one parameter per RFC 6749 form field)
        request: Request,
        grant_type: FormField = None,
        username: FormField = None,
        password: FormField = None,
        tenant: FormField = None,
        scope: FormField = None,
        refresh_token: FormField = None,
        client_id: FormField = None,
        client_secret: FormField = None,
    ) -> JSONResponse:
        """Issues tokens: `password` (with `tenant`), `client_credentials`, `refresh_token`."""
        auth = auth_of(request)
        ip = request.client.host if request.client else None
        try:
            _require_storable(
                grant_type=grant_type,
                username=username,
                password=password,
                tenant=tenant,
                scope=scope,
                refresh_token=refresh_token,
                client_id=client_id,
                client_secret=client_secret,
            )
            if grant_type == "password":
                result = await auth.password_grant(
                    require_request_field(tenant, "tenant"),
                    require_request_field(username, "username"),
                    require_request_field(password, "password"),
                    scope,
                    ip,
                )
            elif grant_type == "client_credentials":
                result = await auth.client_credentials_grant(
                    require_request_field(client_id, "client_id"),
                    require_request_field(client_secret, "client_secret"),
                    scope,
                    ip,
                )
            elif grant_type == "refresh_token":
                result = await auth.refresh_grant(
                    require_request_field(refresh_token, "refresh_token"), scope, ip
                )
            else:
                raise UnsupportedGrantType(f"grant_type {grant_type!r} is not supported")
        except Exception as exc:
            return _token_error(exc)
        return JSONResponse(result.as_json(), headers=_NO_STORE)

    _add_oidc_routes(router, auth_of, oidc_of)

    @router.post("/oauth/revoke")
    async def revoke(request: Request, token: FormField = None) -> JSONResponse:
        """Ends a refresh token's session family and its access tokens (logout); 200 for any
        token as RFC 7009 says, 503 when the revocation could not be recorded."""
        if token:
            try:
                await auth_of(request).revoke_refresh(token)
            except Exception as exc:
                return _unavailable(exc)
        return JSONResponse({}, headers=_NO_STORE)

    @router.get("/.well-known/jwks.json")
    async def jwks(request: Request) -> JSONResponse:
        """Public keys that verify access tokens (retired ones until their tokens expire)."""
        return JSONResponse(
            auth_of(request).signer.jwks(), headers={"Cache-Control": "public, max-age=300"}
        )

    return router


def _add_oidc_routes(
    router: APIRouter,
    auth_of: Callable[[Request], AuthService],
    oidc_of: Callable[[Request], OIDCLogin | None],
) -> None:
    """External sign-in: the login redirect and the provider's callback."""

    @router.get("/oauth/oidc/login", include_in_schema=True)
    async def oidc_login(request: Request, return_to: str | None = None) -> Response:
        """Redirects to the external OpenID Connect provider (404 when none is configured)."""
        oidc = oidc_of(request)
        if oidc is None:
            raise NotFound("OIDC sign-in is not configured")
        try:
            login = await oidc.start(return_to)
        except OAuthError as exc:
            return _oauth_error(exc)
        except Exception as exc:
            return _unavailable(exc)
        response = RedirectResponse(login.url, status_code=302, headers=_NO_STORE)
        response.set_cookie(
            login.cookie_name,
            login.cookie_value,
            max_age=LOGIN_TTL_S,
            path=BINDING_COOKIE_PATH,
            secure=oidc.secure_cookies,
            httponly=True,
            samesite="lax",  # sent on the provider's top-level redirect back, not on subrequests
        )
        return response

    @router.get("/oauth/oidc/callback")
    async def oidc_callback(
        request: Request,
        code: str | None = None,
        state: str | None = None,
        error: str | None = None,
    ) -> Response:
        """The provider sends the browser back here; answers our tokens (or redirects with
        them in the URL fragment to the `return_to` the login started with)."""
        oidc = oidc_of(request)
        if oidc is None:
            raise NotFound("OIDC sign-in is not configured")
        try:
            if error:
                raise InvalidGrant(f"the identity provider answered {error[:100]}")
            state = require_request_field(state, "state")
            identity = await oidc.finish(
                require_request_field(code, "code"),
                state,
                request.cookies.get(binding_cookie_name(state)),
            )
            ip = request.client.host if request.client else None
            tokens = await auth_of(request).external_sign_in(identity, ip)
        except OAuthError as exc:
            response = _oauth_error(exc)
        except Exception as exc:
            response = _unavailable(exc)
        else:
            if identity.return_to:
                fragment = urlencode({k: str(v) for k, v in tokens.as_json().items()})
                response = RedirectResponse(
                    f"{identity.return_to}#{fragment}", status_code=303, headers=_NO_STORE
                )
            else:
                response = JSONResponse(tokens.as_json(), headers=_NO_STORE)
        if state:  # the login is used up, whatever became of it: its cookie goes too
            response.delete_cookie(
                binding_cookie_name(state), path=BINDING_COOKIE_PATH, httponly=True
            )
        return response
