"""REST endpoints of OAuth 2.0: the token endpoint (RFC 6749), revocation (RFC 7009), JWKS."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import JSONResponse

from backend.auth.errors import OAuthError, UnsupportedGrantType
from backend.auth.service import AuthService, require_request_field
from backend.errors import RateLimited

FormField = Annotated[str | None, Form()]

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def oauth_router(auth_of: Callable[[Request], AuthService]) -> APIRouter:
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
        except OAuthError as exc:
            return JSONResponse(
                {"error": exc.error, "error_description": exc.message},
                status_code=exc.status,
                headers=_NO_STORE,
            )
        except RateLimited as exc:
            return JSONResponse(
                {
                    "error": "slow_down",
                    "error_description": exc.message,
                    "retry_after": exc.retry_after_s,
                },
                status_code=429,
                headers={**_NO_STORE, "Retry-After": str(max(1, round(exc.retry_after_s)))},
            )
        return JSONResponse(result.as_json(), headers=_NO_STORE)

    @router.post("/oauth/revoke")
    async def revoke(request: Request, token: FormField = None) -> JSONResponse:
        """Ends a refresh token's session family (logout); always 200 as RFC 7009 says."""
        if token:
            await auth_of(request).revoke_refresh(token)
        return JSONResponse({}, headers=_NO_STORE)

    @router.get("/.well-known/jwks.json")
    async def jwks(request: Request) -> JSONResponse:
        """Public keys that verify access tokens (retired ones until their tokens expire)."""
        return JSONResponse(
            auth_of(request).signer.jwks(), headers={"Cache-Control": "public, max-age=300"}
        )

    return router
