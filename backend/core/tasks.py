"""Shutting down owned background work: a grace period, then cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def drain(tasks: Iterable[asyncio.Task[None]], grace_s: float) -> None:
    """Lets `tasks` finish for `grace_s`, then cancels the rest and waits for them to end."""
    pending = list(tasks)
    if not pending:
        return
    _, still = await asyncio.wait(pending, timeout=grace_s)
    for task in still:
        task.cancel("shutdown")
    await asyncio.gather(*still, return_exceptions=True)
