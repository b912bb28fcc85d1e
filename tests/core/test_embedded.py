"""Embedded PostgreSQL and Valkey: start, persist across restarts, stop; Redis detection."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from backend.core.embedded import EmbeddedPostgres, EmbeddedValkey, local_redis_answers
from tests.conftest import free_port


async def test_embedded_postgres_keeps_data_across_restarts(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pg")
    url = server.start()
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE kept (v int)"))
            await conn.execute(text("INSERT INTO kept VALUES (42)"))
    finally:
        await engine.dispose()
        server.stop()

    url = server.start()
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT v FROM kept")) == 42
    finally:
        await engine.dispose()
        server.stop()


async def test_embedded_valkey_answers_and_stops(tmp_path: Path) -> None:
    server = EmbeddedValkey(tmp_path / "valkey")
    url = server.start()
    client = Redis.from_url(url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()
        server.stop()
    assert not local_redis_answers("127.0.0.1", int(url.rsplit(":", 1)[1]))


def test_redis_detection() -> None:
    assert local_redis_answers()  # the machine's Redis at 6379 (tests require it)
    assert not local_redis_answers("127.0.0.1", free_port())


@pytest.mark.parametrize("port", [1])
def test_detection_of_a_closed_privileged_port(port: int) -> None:
    assert not local_redis_answers("127.0.0.1", port, timeout_s=0.2)
