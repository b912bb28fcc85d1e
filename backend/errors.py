"""Expected errors: each has a stable code (GraphQL `extensions.code`) and an HTTP status.

Anything raised that is not an `AppError` is a bug: clients see a masked "internal error" and the
exception is recorded on the trace.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from pydantic import ValidationError as PydanticValidationError


class AppError(Exception):
    """Base of every expected error. Subclasses fix `code` and `status`."""

    code: ClassVar[str] = "INTERNAL"
    status: ClassVar[int] = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    @property
    def extensions(self) -> dict[str, Any]:
        """What GraphQL puts under `extensions` and REST under `error`: the code plus details.

        graphql-core copies `extensions` from an exception it wraps, so even an error raised
        outside a resolver (an extension hook) reaches the client with its code.
        """
        return {"code": self.code, **self.details}

    def to_extensions(self) -> dict[str, Any]:
        return self.extensions


class ValidationFailed(AppError):
    code = "BAD_USER_INPUT"
    status = 400

    @classmethod
    def listing(cls, message: str, exc: PydanticValidationError) -> ValidationFailed:
        """The error for a document pydantic refused: each problem with its path."""
        return cls(
            message,
            problems=[
                {"path": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
                for e in exc.errors()
            ],
        )


class Unauthenticated(AppError):
    code = "UNAUTHENTICATED"
    status = 401


class Forbidden(AppError):
    code = "FORBIDDEN"
    status = 403


class NotFound(AppError):
    code = "NOT_FOUND"
    status = 404


class Conflict(AppError):
    code = "CONFLICT"
    status = 409


class PayloadTooLarge(AppError):
    code = "PAYLOAD_TOO_LARGE"
    status = 413


class RateLimited(AppError):
    code = "RATE_LIMITED"
    status = 429

    def __init__(self, message: str, *, retry_after_s: float, **extensions: Any) -> None:
        super().__init__(message, retryAfter=round(retry_after_s, 3), **extensions)
        self.retry_after_s = retry_after_s


class ServiceUnavailable(AppError):
    code = "SERVICE_UNAVAILABLE"
    status = 503


class InternalError(AppError):
    """The masked form of an unexpected exception, as clients see it."""

    code = "INTERNAL_SERVER_ERROR"
    status = 500


# SQLSTATE classes of a server that is going away, starting, out of connections, or that
# cancelled a statement past its timeout: retryable, not a bug.
_UNAVAILABLE_SQLSTATES = ("08", "53", "57P", "57014")

UNAVAILABLE_MESSAGE = "a backing service is busy or unreachable; retry shortly"


def is_overload(exc: BaseException) -> bool:
    """A backing service (PostgreSQL, Redis) unreachable or saturated: retryable, not a bug."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ReadOnlyError
    from redis.exceptions import TimeoutError as RedisTimeout
    from sqlalchemy.exc import DBAPIError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    if isinstance(
        exc,
        RedisConnectionError
        | RedisTimeout
        | ReadOnlyError  # a replica promoted while we wrote: the next try finds the primary
        | PoolTimeout
        | OperationalError
        | ConnectionError,
    ):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        return isinstance(state, str) and state.startswith(_UNAVAILABLE_SQLSTATES)
    return False


def _is_missing_user(exc: BaseException) -> bool:
    """A row that names a user who is gone (deleted while their token was still valid)."""
    from sqlalchemy.exc import IntegrityError

    if not isinstance(exc, IntegrityError):
        return False
    state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    driver_error = getattr(exc.orig, "driver_exception", None)  # asyncpg's own error
    constraint = getattr(driver_error, "constraint_name", None) or ""
    # Constraint names follow the naming convention fk_<table>_<column>_<referred table>.
    return state == "23503" and constraint.startswith("fk_") and constraint.endswith("_users")


def expected_error(exc: BaseException) -> AppError | None:
    """The typed error a client gets for an exception that is not a bug though it is not an
    AppError: a backing service down (SERVICE_UNAVAILABLE, never the driver's message or the
    service's address), a write for a user who no longer exists (UNAUTHENTICATED), or a value
    PostgreSQL refused (BAD_USER_INPUT)."""
    if isinstance(exc, AppError):
        return exc
    if is_overload(exc):
        return ServiceUnavailable(UNAVAILABLE_MESSAGE, retryAfter=1)
    if _is_missing_user(exc):
        return Unauthenticated("the account no longer exists")
    if is_bad_value(exc):
        return ValidationFailed(BAD_VALUE_MESSAGE)
    return None


def is_bad_value(exc: BaseException) -> bool:
    """PostgreSQL or its driver refused a value the client sent: text with a NUL or a lone
    surrogate, a number out of range (SQLSTATE class 22, "data exception"). The input's fault,
    so a 400, not a 500; checks at the edge (backend.core.untrusted) should refuse such values
    first, and this is the last line behind them."""
    from sqlalchemy.exc import DBAPIError

    if not isinstance(exc, DBAPIError) or exc.orig is None:
        return False
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate.startswith("22")
    # asyncpg could not encode a parameter (a lone surrogate, an int over 64 bits): its
    # DataError for a query argument is a ValueError.
    return isinstance(exc.orig.__cause__, ValueError)


BAD_VALUE_MESSAGE = (
    "a value could not be stored: text with a NUL character or invalid Unicode, or a number "
    "out of range"
)
