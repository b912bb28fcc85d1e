"""An embedding model's versions on a live server: promoting a new version re-embeds every chunk
into the slot search does not read, search keeps the old version's vectors (and its query
embedder) until the last chunk has the new ones, then switches at once; the progress is visible;
a rollback switches back, re-embedding only what was ingested meanwhile. Embedding policies
that would mix vector spaces are refused."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.config import Settings
from backend.core.db import Database
from backend.knowledge.embeddings import LOCAL_NAME
from backend.knowledge.service import SearchMode
from backend.lifecycle.policy import split_pin
from tests.agents.test_runs import gql
from tests.conftest import LiveServer, free_port, scaled, serve_asgi, serve_live
from tests.faults.servers import Stubs
from tests.lifecycle import test_vision_swap as swap
from tests.lifecycle.test_graphql import REGISTER
from tests.lifecycle.test_vision_swap import EMAIL, token_of

MODEL, FIRST = split_pin(LOCAL_NAME)
operators = swap.operators  # a committed operator tenant (fixture)
STATE = f"""query {{ model(name: "{MODEL}") {{ policy {{ live }} reembedding {{
  servingVersion status targetVersion done total error }} }} }}"""
DOCUMENTS = [
    (
        f"doc-{i}.md",
        f"# Note {i}\n\n{body}\n".encode(),
    )
    for i, body in enumerate(
        [
            "Refunds are paid within fourteen days of the return reaching the warehouse.",
            "Support answers every ticket within one working day, weekends excepted.",
            "The office in Lyon opens at eight and closes at six on weekdays.",
            "Invoices are sent on the first of each month by e-mail only.",
            "Passwords must be changed every ninety days and never reused.",
            "Parcels above thirty kilograms travel by freight, not by post.",
        ]
    )
]


def operate(settings: Settings, operators: str, **knowledge: float) -> None:
    """A live server the test's operators run (no limits), with these knowledge settings."""
    settings.privacy = settings.privacy.model_copy(update={"operator_tenant": operators})
    settings.limits = settings.limits.model_copy(update={"enabled": False})
    settings.knowledge = settings.knowledge.model_copy(update=knowledge)


async def register(
    server: LiveServer, token: str, version: str, port: int, **spec: Any
) -> dict[str, Any]:
    """An endpoint version of the knowledge base's embedding model (at `port`)."""
    endpoint = {"provider": "openai", "base_url": f"http://127.0.0.1:{port}/v1", **spec}
    return await gql(
        server, token, REGISTER, model=MODEL, version=version, spec=endpoint, kind="EMBEDDING"
    )


async def promote(server: LiveServer, token: str, version: str) -> dict[str, Any]:
    return await gql(
        server,
        token,
        f'mutation {{ promoteModelVersion(model: "{MODEL}", version: "{version}") {{ live }} }}',
    )


async def ingest(server: LiveServer, tenant: str, name: str, data: bytes) -> None:
    knowledge = server.services.knowledge
    principal = await server.services.auth.principal_for(tenant, EMAIL)
    job = await knowledge.ingest(principal, data, filename=name)
    async with asyncio.timeout(scaled(60)):
        while (await knowledge.job(principal, job.id)).status != "completed":
            await asyncio.sleep(0.05)


async def state(server: LiveServer, token: str) -> dict[str, Any]:
    body = await gql(server, token, STATE)
    assert "errors" not in body, body
    return body["data"]["model"]  # type: ignore[no-any-return]


async def until(server: LiveServer, token: str, done: Any) -> dict[str, Any]:
    async with asyncio.timeout(scaled(90)):
        while True:
            found = await state(server, token)
            if done(found["reembedding"]):
                return found
            await asyncio.sleep(0.05)


async def slot_tags(settings: Settings, engine: AsyncEngine) -> list[tuple[str, str | None]]:
    """(slot 0's tag, slot 1's tag) of every chunk, as the table owner sees them."""
    db = Database.connect(engine.url.render_as_string(hide_password=False), settings.database)
    try:
        async with db.engine.connect() as conn:
            rows = await conn.execute(text("SELECT embedding_model, embedding_b_model FROM chunks"))
            return [(r[0], r[1]) for r in rows]
    finally:
        await db.dispose()


async def test_a_promoted_embedding_version_is_searched_only_once_every_chunk_has_its_vectors(
    settings: Settings, operators: str, engine: AsyncEngine
) -> None:
    operate(settings, operators, reembed_check_s=0.5, reembed_batch=2)
    stubs = Stubs()
    async with serve_asgi(stubs.app) as port, serve_live(settings) as server:
        token = await token_of(server, operators)
        knowledge = server.services.knowledge
        principal = await server.services.auth.principal_for(operators, EMAIL)
        for name, data in DOCUMENTS:
            await ingest(server, operators, name, data)
        question = "How long do refunds take?"
        hits = await knowledge.search(principal, question, 1, mode=SearchMode.VECTOR)
        assert hits[0].source == "doc-0.md"
        assert (await state(server, token))["reembedding"]["servingVersion"] == FIRST

        wide = await register(server, token, "wide", port, dimensions=512)
        assert wide["errors"][0]["extensions"]["code"] == "INVALID_MODEL_SPEC", wide
        registered = await register(server, token, "2", port, model="stub-embeddings")
        assert registered["data"]["registerModelVersion"]["status"] == "READY", registered
        split = await gql(
            server,
            token,
            "mutation($m: String!) { setTrafficPolicy(model: $m, arms: ["
            f'{{version: "{FIRST}", weight: 50}}, {{version: "2", weight: 50}}]) {{ live }} }}',
            m=MODEL,
        )
        assert split["errors"][0]["extensions"]["code"] == "INVALID_TRAFFIC_POLICY", split

        stubs.embedding_delay_s = 0.3  # the re-embedding takes a while: search meanwhile
        promoted = await promote(server, token, "2")
        assert promoted["data"]["promoteModelVersion"]["live"] == "2", promoted
        running = await until(server, token, lambda r: r["status"] == "running" and r["done"])
        progress = running["reembedding"]
        assert progress["targetVersion"] == "2"
        assert progress["servingVersion"] == FIRST
        # every tenant's chunks (other tests' too, in a shared database): at least these six
        assert 0 < progress["done"] < progress["total"], progress
        assert progress["total"] >= len(DOCUMENTS), progress
        # still the first version's vectors and query embedder: MiniLM understands the question
        hits = await knowledge.search(principal, question, 1, mode=SearchMode.VECTOR)
        assert hits[0].source == "doc-0.md"
        assert knowledge.embedder.name == LOCAL_NAME

        stubs.embedding_delay_s = 0.0
        done = await until(server, token, lambda r: r["servingVersion"] == "2")
        assert done["reembedding"]["status"] == "completed", done
        assert done["reembedding"]["done"] == done["reembedding"]["total"], done
        async with asyncio.timeout(scaled(30)):  # the switch is published to the replica
            while knowledge.embedder.name != f"{MODEL}@2":
                await asyncio.sleep(0.05)
        assert {b for _, b in await slot_tags(settings, engine)} == {f"{MODEL}@2"}
        # texts are embedded by version 2 now (the stub), and meet its stored vectors
        [chunk] = await knowledge.search(principal, "invoices", 1, mode=SearchMode.TEXT)
        assert chunk.source == "doc-3.md"
        calls = stubs.embedding_calls
        [similar] = await knowledge.similarities(principal, [chunk.text], [str(chunk.chunk_id)])
        assert stubs.embedding_calls > calls
        assert similar[str(chunk.chunk_id)] > 0.999  # the stub's vector of the same text
        documents = await knowledge.documents(principal, 20, None)
        assert {d.embedding_model for d in documents.items} == {f"{MODEL}@2"}

        # a document ingested now is embedded by version 2; rolling back re-embeds only it
        await ingest(
            server, operators, "late.md", b"# Late\n\nThe canteen serves soup on Fridays.\n"
        )
        back = await gql(
            server, token, f'mutation {{ rollbackModel(model: "{MODEL}") {{ live }} }}'
        )
        assert back["data"]["rollbackModel"]["live"] == FIRST, back
        rolled = await until(
            server, token, lambda r: r["servingVersion"] == FIRST and r["status"] == "completed"
        )
        # the first version's vectors are still there: only what came since is re-embedded
        assert 1 <= rolled["reembedding"]["total"] < progress["total"], rolled
        async with asyncio.timeout(scaled(30)):
            while knowledge.embedder.name != LOCAL_NAME:
                await asyncio.sleep(0.05)
        assert {a for a, _ in await slot_tags(settings, engine)} == {LOCAL_NAME}
        hits = await knowledge.search(principal, "When is there soup?", 1, mode=SearchMode.VECTOR)
        assert hits[0].source == "late.md"


async def test_a_promoted_version_that_cannot_embed_leaves_search_on_the_live_vectors(
    settings: Settings, operators: str
) -> None:
    """Its endpoint is down: the re-embedding fails (the reason is shown) and is tried again;
    search never stops working on the first version; once the endpoint answers, it completes."""
    operate(settings, operators, reembed_check_s=0.3)
    port = free_port()  # nothing listens there yet
    async with serve_live(settings) as server:
        token = await token_of(server, operators)
        knowledge = server.services.knowledge
        principal = await server.services.auth.principal_for(operators, EMAIL)
        name, data = DOCUMENTS[0]
        await ingest(server, operators, name, data)
        registered = await register(server, token, "3", port)
        assert registered["data"]["registerModelVersion"]["status"] == "READY", registered
        promoted = await promote(server, token, "3")
        assert promoted["data"]["promoteModelVersion"]["live"] == "3", promoted
        failed = await until(server, token, lambda r: r["status"] == "failed")
        assert failed["reembedding"]["servingVersion"] == FIRST, failed
        assert failed["reembedding"]["error"], failed
        hits = await knowledge.search(principal, "How long do refunds take?", 1)
        assert hits[0].source == name
        assert knowledge.embedder.name == LOCAL_NAME

        async with serve_asgi(Stubs().app, port=port):  # the endpoint is back
            done = await until(server, token, lambda r: r["servingVersion"] == "3")
            assert done["reembedding"]["status"] == "completed", done
            async with asyncio.timeout(scaled(30)):
                while knowledge.embedder.name != f"{MODEL}@3":
                    await asyncio.sleep(0.05)
            assert await knowledge.search(principal, "refunds", 1, mode=SearchMode.TEXT)


async def test_a_shadow_embedding_version_is_compared_on_sampled_searches_never_served(
    settings: Settings, operators: str
) -> None:
    """A shadow version's vectors fill the other slot (`ready` when complete); searches then
    also run on it, after their answer: the top-10 overlap of the two rankings is in
    `modelComparison`, and what the caller gets is still the live version's."""
    operate(settings, operators, reembed_check_s=0.3)
    stubs = Stubs()
    async with serve_asgi(stubs.app) as port, serve_live(settings) as server:
        token = await token_of(server, operators)
        knowledge = server.services.knowledge
        principal = await server.services.auth.principal_for(operators, EMAIL)
        for name, data in DOCUMENTS:
            await ingest(server, operators, name, data)
        registered = await register(server, token, "4", port)
        assert registered["data"]["registerModelVersion"]["status"] == "READY", registered
        shadowed = await gql(
            server,
            token,
            "mutation($m: String!) { setTrafficPolicy(model: $m, arms: ["
            f'{{version: "{FIRST}", weight: 100}}], shadow: "4", shadowRate: 1.0) '
            "{ live shadow } }",
            m=MODEL,
        )
        assert shadowed["data"]["setTrafficPolicy"] == {"live": FIRST, "shadow": "4"}, shadowed
        ready = await until(server, token, lambda r: r["status"] == "ready")
        assert ready["reembedding"]["targetVersion"] == "4", ready
        assert ready["reembedding"]["servingVersion"] == FIRST, ready

        async with asyncio.timeout(scaled(60)):
            while (found := await swap.shadow_agreement(server, token, MODEL)) is None:
                hits = await knowledge.search(principal, "How long do refunds take?", 3)
                assert hits[0].source == "doc-0.md"  # the live version's answer
                assert knowledge.embedder.name == LOCAL_NAME
                await asyncio.sleep(0.2)
        assert found["failed"] == 0, found
        [overlap] = found["metrics"]
        assert overlap["name"] == "top10_overlap"
        assert 0.0 <= overlap["mean"] <= 1.0
