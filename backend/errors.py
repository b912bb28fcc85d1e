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


def is_overload(exc: BaseException) -> bool:
    """A backing service (PostgreSQL, Redis) unreachable or saturated: retryable, not a bug."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeout
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    return isinstance(
        exc, RedisConnectionError | RedisTimeout | PoolTimeout | OperationalError | ConnectionError
    )
