"""Root subscription fields."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from datetime import UTC, datetime

import strawberry
from strawberry.types import Info

from backend.errors import ValidationFailed
from backend.graphql.context import Context
from backend.graphql.knowledge import KnowledgeSubscription
from backend.graphql.permissions import until_credential_ends
from backend.graphql.runs import RunSubscription
from backend.graphql.types import Heartbeat
from backend.graphql.vision import VisionSubscription

MAX_HEARTBEAT_COUNT = 1_000_000


async def _ticks(interval_s: float, count: int | None) -> AsyncGenerator[Heartbeat, None]:
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    seq = 0
    while count is None or seq < count:
        yield Heartbeat(seq=seq, at=datetime.now(UTC))
        seq += 1
        # A fixed schedule, not sleep(interval): slow consumers do not make ticks drift.
        next_at += interval_s
        await asyncio.sleep(max(0.0, next_at - loop.time()))


@strawberry.type
class PlatformSubscription:
    @strawberry.subscription(
        description="Ticks every `intervalMs` until `count` ticks (or forever): proves the socket."
    )
    async def heartbeat(
        self,
        info: Info[Context, None],
        interval_ms: int = 1000,
        count: int | None = None,
    ) -> AsyncGenerator[Heartbeat, None]:
        limits = info.context.state.settings.graphql
        if not limits.heartbeat_min_interval_ms <= interval_ms <= limits.heartbeat_max_interval_ms:
            raise ValidationFailed(
                f"intervalMs must be between {limits.heartbeat_min_interval_ms} and "
                f"{limits.heartbeat_max_interval_ms}",
                field="intervalMs",
            )
        if count is not None and not 1 <= count <= MAX_HEARTBEAT_COUNT:
            raise ValidationFailed(
                f"count must be between 1 and {MAX_HEARTBEAT_COUNT}", field="count"
            )
        # On an authenticated socket the stream ends (UNAUTHENTICATED) when the credential
        # expires or is revoked.
        return until_credential_ends(info.context, _ticks(interval_ms / 1000, count))


@strawberry.type
class Subscription(
    PlatformSubscription, RunSubscription, KnowledgeSubscription, VisionSubscription
):
    pass
