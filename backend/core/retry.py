"""Waiting out short outages of PostgreSQL and Redis: retries with backoff, for a bounded time.

Work that must not be lost (a run's answer, an ingested document, the last event of a stream)
retries the step that failed for as long as the operator allows (a setting per area), with
exponential backoff and jitter; errors that are not an outage are raised at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from backend.errors import ServiceUnavailable, is_overload

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_WAIT_S = 0.1
LONGEST_WAIT_S = 2.0


def is_transient(exc: BaseException) -> bool:
    """An error a backing service gives while it is down, restarting or unreachable."""
    if is_overload(exc) or type(exc) is ServiceUnavailable:  # the database pool was exhausted
        return True
    from redis.exceptions import BusyLoadingError, ReadOnlyError, TryAgainError
    from sqlalchemy.exc import DBAPIError, InterfaceError

    if isinstance(exc, BusyLoadingError | ReadOnlyError | TryAgainError | InterfaceError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, DBAPIError) and _asyncpg_transient(exc.orig):
        return True
    # socket errors (connecting to PostgreSQL over its Unix socket while it is stopped gives
    # FileNotFoundError: the socket file is gone), connect timeouts
    return isinstance(exc, OSError) and not isinstance(exc, PermissionError)


def _asyncpg_transient(orig: BaseException | None) -> bool:
    try:
        import asyncpg
    except ImportError:  # pragma: no cover (asyncpg is the only driver we use)
        return False
    if orig is None:
        return False
    cause = getattr(orig, "__cause__", None) or orig
    return isinstance(
        cause,
        asyncpg.PostgresConnectionError  # connection lost, refused, does not exist
        | asyncpg.CannotConnectNowError  # starting up or shutting down
        | asyncpg.AdminShutdownError
        | asyncpg.CrashShutdownError
        | asyncpg.InterfaceError,
    ) or (type(cause).__name__ in {"ConnectionDoesNotExistError", "ConnectionResetError"})


async def retrying(
    step: Callable[[], Awaitable[T]],
    *,
    within_s: float,
    what: str,
    first_wait_s: float = FIRST_WAIT_S,
    longest_wait_s: float = LONGEST_WAIT_S,
) -> T:
    """`step()`, again after each transient error until `within_s` have passed; then the
    last error. Any other error is raised at once. `what` names the step in the log."""
    deadline = time.monotonic() + within_s
    wait = first_wait_s
    attempt = 1
    while True:
        try:
            return await step()
        except Exception as exc:
            if not is_transient(exc):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("%s: gave up after %d attempts: %r", what, attempt, exc)
                raise
            pause = min(left, wait * (0.5 + random.random()))  # noqa: S311 (jitter)
            if attempt == 1:
                log.warning("%s: %r; retrying for up to %.0f s", what, exc, within_s)
            await asyncio.sleep(pause)
            wait = min(longest_wait_s, wait * 2)
            attempt += 1
