"""Auth errors: GraphQL/REST codes, and the OAuth 2.0 error names of RFC 6749 section 5.2."""

from __future__ import annotations

from typing import ClassVar

from backend.errors import AppError, Forbidden, Unauthenticated


class InvalidToken(Unauthenticated):
    """A bearer token or API key that is malformed, forged, expired or revoked."""


class MissingScope(Forbidden):
    pass


class NotOperator(Forbidden):
    """Only platform operators (owners of SIGHTLINE_PRIVACY_OPERATOR_TENANT) may do this."""


class OAuthError(AppError):
    """An error of the token endpoint; `error` is the RFC 6749 name."""

    status = 400
    error: ClassVar[str] = "invalid_request"

    @property
    def code(self) -> str:  # type: ignore[override]
        return self.error.upper()


class InvalidRequest(OAuthError):
    error = "invalid_request"


class InvalidGrant(OAuthError):
    error = "invalid_grant"


class InvalidClient(OAuthError):
    status = 401
    error = "invalid_client"


class UnsupportedGrantType(OAuthError):
    error = "unsupported_grant_type"


class InvalidScope(OAuthError):
    error = "invalid_scope"
