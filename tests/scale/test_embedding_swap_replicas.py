"""An embedding model's promotion across two replicas: promoted through one, the re-embedding
runs once (on one replica) while both keep searching the old vectors and ingesting; when every
chunk has the new version's vectors, both replicas switch their query embedder; a rollback
switches both back. Searches on either replica never fail meanwhile."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import text

from backend.core.db import Database
from tests.conftest import REDIS_URL, scaled
from tests.faults.conftest import gql, ingest, sign_in, until
from tests.faults.servers import AppServer, PrivatePostgres, Stubs, server_environment, serving
from tests.lifecycle.test_graphql import REGISTER

pytestmark = [pytest.mark.scale, pytest.mark.timeout(900)]

MODEL = "stub-embeddings"  # the fault suite's embedder (its first registry version is "1")
STATE = f"""{{ model(name: "{MODEL}") {{ policy {{ live }} reembedding {{
  servingVersion status targetVersion done total }} }} }}"""
SEARCH = """query($q: String!) { search(query: $q, k: 1, mode: TEXT) { source } }"""
JOB = "query($id: ID!) { ingestionJob(id: $id) { status } }"
NOTES = [
    "Refunds are paid within fourteen days of the return reaching the warehouse.",
    "Support answers every ticket within one working day, weekends excepted.",
    "The office in Lyon opens at eight and closes at six on weekdays.",
    "Invoices are sent on the first of each month by e-mail only.",
    "Passwords must be changed every ninety days and never reused.",
    "Parcels above thirty kilograms travel by freight, not by post.",
]
# About 25 chunks of words the searches below never use: at two chunks a batch and 0.3 s a call
# the re-embedding lasts several seconds, longer than the checks made while it runs (with the
# six notes alone it could finish between them, and the replicas had switched to version 2)
ARCHIVE = " ".join(
    f"Shelf {i} of the archive holds ledgers bound in green cloth, numbered and dated by hand."
    for i in range(250)
)


@pytest.fixture
async def leave_the_embedder_as_found(database: Database) -> AsyncIterator[None]:
    """The package's database outlives this test: its embedder's registry entry and slots go
    back to what the next test's servers seed (torn down after the replicas stop)."""
    yield
    async with database.engine.begin() as conn:
        await conn.execute(text("DELETE FROM knowledge_embeddings"))
        await conn.execute(text("DELETE FROM registry_models WHERE name = :m"), {"m": MODEL})


@pytest.fixture
async def replicas(
    leave_the_embedder_as_found: None,
    tmp_path: Path,
    postgres: PrivatePostgres,
    stubs: tuple[Stubs, str],
    key_prefix: str,
    redis: Redis,  # the shared Redis: this test's keys are deleted afterwards
    account: dict[str, Any],
) -> AsyncIterator[tuple[AppServer, AppServer]]:
    _, url = stubs
    environment = server_environment(
        database_url=postgres.url,
        redis_url=REDIS_URL,
        stubs_url=url,
        redis_key_prefix=key_prefix,
        knowledge_reembed_check_s=0.5,
        knowledge_reembed_batch=2,
        models_reconcile_s=2,
        privacy_operator_tenant=account["tenant"],
        limits_enabled="false",
    )
    a = AppServer(tmp_path / "replica-a", environment)
    b = AppServer(tmp_path / "replica-b", environment)
    async with serving(a, b):
        yield a, b


async def _state(server: AppServer, token: str) -> dict[str, Any]:
    body = await gql(server.http_url, token, STATE)
    assert "errors" not in body, body
    return body["data"]["model"]["reembedding"]  # type: ignore[no-any-return]


async def _embeds_with(server: AppServer, token: str, name: str) -> bool:
    """Whether the replica's knowledge base embeds with `name` (its `/v1/embeddings` model)."""
    async with httpx.AsyncClient(base_url=server.http_url, timeout=scaled(30)) as http:
        response = await http.post(
            "/v1/embeddings",
            json={"model": name, "input": ["hello"]},
            headers={"authorization": f"Bearer {token}"},
        )
    return response.status_code == 200


async def _ingested(server: AppServer, token: str, note: str, source: str) -> None:
    job = await ingest(server.http_url, token, note, source)

    async def completed() -> bool:
        body = await gql(server.http_url, token, JOB, id=job)
        return bool(body["data"]["ingestionJob"]["status"] == "COMPLETED")

    await until(completed, f"{source} ingested", timeout_s=scaled(60))


async def _finds(server: AppServer, token: str, words: str, source: str) -> None:
    body = await gql(server.http_url, token, SEARCH, q=words)
    assert "errors" not in body, body
    assert [r["source"] for r in body["data"]["search"]] == [source], body


async def test_an_embedding_promotion_reembeds_once_and_switches_both_replicas(
    replicas: tuple[AppServer, AppServer], stubs: tuple[Stubs, str], account: dict[str, Any]
) -> None:
    a, b = replicas
    stub, url = stubs
    tokens = [await sign_in(a.http_url, account), await sign_in(b.http_url, account)]
    for i, note in enumerate(NOTES):
        await _ingested(a, tokens[0], note, f"note-{i}")
    await _ingested(a, tokens[0], ARCHIVE, "archive")
    first = await _state(a, tokens[0])
    assert first["servingVersion"] == "1", first

    spec = {"provider": "openai", "base_url": f"{url}/v1", "model": MODEL}
    registered = await gql(
        b.http_url, tokens[1], REGISTER, model=MODEL, version="2", spec=spec, kind="EMBEDDING"
    )
    assert registered["data"]["registerModelVersion"]["status"] == "READY", registered

    stub.embedding_delay_s = 0.3  # slow enough to watch it run
    promoted = await gql(
        a.http_url,
        tokens[0],
        f'mutation {{ promoteModelVersion(model: "{MODEL}", version: "2") {{ live }} }}',
    )
    assert promoted["data"]["promoteModelVersion"]["live"] == "2", promoted

    async def running() -> bool:
        state = await _state(b, tokens[1])
        return state["status"] == "running" and 0 < state["done"] < state["total"]

    await until(running, "the re-embedding under way", timeout_s=scaled(60))
    # meanwhile both replicas search (and embed with) version 1, and ingestion goes on
    for server, token in zip(replicas, tokens, strict=True):
        await _finds(server, token, "freight kilograms", "note-5")
        assert await _embeds_with(server, token, MODEL)
    await _ingested(b, tokens[1], "The canteen serves soup on Fridays.", "late")

    stub.embedding_delay_s = 0.0

    async def switched() -> bool:
        state = await _state(a, tokens[0])
        return bool(state["servingVersion"] == "2")

    await until(switched, "the switch to version 2", timeout_s=scaled(120))
    done = await _state(a, tokens[0])
    assert done["status"] == "completed", done
    assert done["done"] == done["total"], done

    async def both_on(name: str) -> bool:
        return all([await _embeds_with(s, t, name) for s, t in zip(replicas, tokens, strict=True)])

    await until(lambda: both_on(f"{MODEL}@2"), "both replicas embed with version 2")
    for server, token in zip(replicas, tokens, strict=True):
        await _finds(server, token, "soup canteen", "late")  # ingested during the re-embedding
        await _finds(server, token, "invoices month", "note-3")

    back = await gql(
        b.http_url, tokens[1], f'mutation {{ rollbackModel(model: "{MODEL}") {{ live }} }}'
    )
    assert back["data"]["rollbackModel"]["live"] == "1", back
    await until(lambda: both_on(MODEL), "both replicas back on version 1", timeout_s=scaled(120))
    rolled = await _state(a, tokens[0])
    assert (rolled["servingVersion"], rolled["status"]) == ("1", "completed"), rolled
    for server, token in zip(replicas, tokens, strict=True):
        await _finds(server, token, "soup canteen", "late")
