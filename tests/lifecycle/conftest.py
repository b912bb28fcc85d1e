"""Lifecycle fixtures: the per-version figures on the real Redis, under the test's key prefix."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from backend.config import LifecycleSettings
from backend.core.redis import KeySpace
from backend.lifecycle._series import Series
from backend.lifecycle.shadow import ShadowLedger
from backend.lifecycle.stats import ServingStats


@pytest.fixture
def lifecycle_settings() -> LifecycleSettings:
    return LifecycleSettings()


@pytest.fixture
async def series(
    redis: Redis, key_prefix: str, lifecycle_settings: LifecycleSettings
) -> AsyncIterator[Series]:
    kept = Series(redis, KeySpace(key_prefix), lifecycle_settings)
    yield kept
    await kept.close()


@pytest.fixture
def stats(series: Series) -> ServingStats:
    return ServingStats(series)


@pytest.fixture
def ledger(series: Series) -> ShadowLedger:
    return ShadowLedger(series)
