"""The knowledge base through the API, as a client uses it: a multipart upload, the job's
progress over a WebSocket subscription, search, and a chat answer citing the uploaded text."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.config import BudgetSpec, ChatSettings, CostSettings, ModelSpec, Settings
from backend.knowledge.embeddings import LocalEmbedder
from tests.agents.test_agent import events_of, kinds, text
from tests.agents.test_runs import gql, sign_in, start_run
from tests.conftest import LiveServer, scaled, serve_live
from tests.graphql.ws import results
from tests.llm_stub import LLMStub

HANDBOOK = b"""# Handbook

## Refunds

Refunds are paid within fourteen days of the return reaching our warehouse in Lyon.

## Support

Support answers every ticket within one working day.
"""

INGEST = """mutation($file: Upload!, $source: String) {
  ingestDocument(file: $file, source: $source) { id status source } }"""

JOB_EVENTS = """subscription($id: ID!) { ingestionJobEvents(id: $id) {
  __typename cursor
  ... on IngestionProgress { status done total }
  ... on IngestionCompleted { status documentId chunks }
  ... on IngestionFailed { code message } } }"""


RELOAD = """query($id: ID!) { conversation(id: $id) { messages(first: 10) { edges { node {
  role content
  sources { index chunkId documentId title text score heading page charStart charEnd }
  citations { index chunkId documentId title answerStart answerEnd confidence explicit }
} } } } }"""


def assistant_of(reloaded: dict[str, Any]) -> dict[str, Any]:
    assert "errors" not in reloaded, reloaded
    edges = reloaded["data"]["conversation"]["messages"]["edges"]
    assert [e["node"]["role"] for e in edges] == ["USER", "ASSISTANT"]
    assert edges[0]["node"]["sources"] == edges[0]["node"]["citations"] == []
    return edges[1]["node"]  # type: ignore[no-any-return]


async def upload(
    server: LiveServer, token: str, name: str, data: bytes, source: str | None = None
) -> dict[str, Any]:
    operations = {"query": INGEST, "variables": {"file": None, "source": source}}
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        response = await http.post(
            "/graphql",
            data={
                "operations": json.dumps(operations),
                "map": json.dumps({"0": ["variables.file"]}),
            },
            files={"0": (name, data, "application/octet-stream")},
            headers={"authorization": f"Bearer {token}"},
        )
    return response.json()


async def job_events(server: LiveServer, token: str, job_id: str) -> list[dict[str, Any]]:
    return await results(
        server.ws_url, token, JOB_EVENTS, {"id": job_id}, "ingestionJobEvents", timeout=60
    )


async def test_upload_follow_search_and_cite(
    settings: Settings,
    engine: AsyncEngine,
    account: dict,
    llm: tuple[LLMStub, str],
    embedder: LocalEmbedder,
) -> None:
    _, url = llm
    settings.chat = ChatSettings(llm_base_url=url, llm_model="tools", run_lease_s=1)
    async with serve_live(settings, embedder=embedder) as server:
        token = await sign_in(server, account)
        sent = await upload(server, token, "handbook.md", HANDBOOK)
        assert "errors" not in sent, sent
        job = sent["data"]["ingestDocument"]
        assert job["source"] == "handbook.md"
        events = await job_events(server, token, job["id"])
        assert events[-1]["__typename"] == "IngestionCompleted", events
        assert events[-1]["chunks"] >= 2
        assert any(e.get("status") == "running" for e in events)

        found = await gql(
            server,
            token,
            "query($q: String!) { search(query: $q, k: 2) "
            "{ chunkId documentTitle heading text score vectorRank textRank } }",
            q="how long until I get my money back",
        )
        top = found["data"]["search"][0]
        assert "fourteen days" in top["text"]
        assert top["heading"] == "Handbook > Refunds"
        assert top["documentTitle"] == "Handbook"

        # The same bytes again: nothing to do.
        again = await upload(server, token, "handbook.md", HANDBOOK)
        events = await job_events(server, token, again["data"]["ingestDocument"]["id"])
        assert events[-1]["status"] == "UNCHANGED".lower()

        # The agent searches it and cites it; the citation opens the chunk.
        conversation_id, run_id = await start_run(server, token, "refund time")
        answer = await events_of(server, token, run_id)
        assert "CitationAdded" in kinds(answer)
        assert text(answer) == "Found it [1] and [2]."
        citation = next(e for e in answer if e["__typename"] == "CitationAdded")
        opened = await gql(
            server,
            token,
            "query($id: ID!) { chunk(id: $id) { text heading documentId } }",
            id=citation["chunkId"],
        )
        assert opened["data"]["chunk"]["documentId"] == citation["documentId"]
        # read again, the answer keeps its sources and the citation the model wrote
        conversation = await gql(server, token, RELOAD, id=conversation_id)
        stored = assistant_of(conversation)
        assert [s["index"] for s in stored["sources"]] == list(range(1, len(stored["sources"]) + 1))
        assert stored["citations"][0] == {
            "index": 1,
            "chunkId": citation["chunkId"],
            "documentId": citation["documentId"],
            "title": "Handbook",
            "answerStart": 9,
            "answerEnd": 12,
            "confidence": 1.0,
            "explicit": True,
        }

        # Bad input: typed errors, never a 500.
        image = await upload(server, token, "notes.md", b"\x89PNG\r\n\x1a\n" + bytes(64))
        assert image["errors"][0]["extensions"]["code"] == "UNSUPPORTED_MEDIA_TYPE"
        blank = await gql(server, token, 'mutation { ingestDocument(text: "  ") { id } }')
        assert blank["errors"][0]["extensions"]["code"] == "UNREADABLE_DOCUMENT"
        neither = await gql(server, token, "mutation { ingestDocument { id } }")
        assert neither["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
        empty = await gql(server, token, '{ search(query: "   ") { chunkId } }')
        assert empty["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
        foreign = await gql(
            server,
            token,
            "query($id: ID!) { document(id: $id) { id } }",
            id="00000000-0000-0000-0000-000000000000",
        )
        assert foreign["errors"][0]["extensions"]["code"] == "NOT_FOUND"


async def test_an_answer_without_markers_gets_citations_that_come_back_on_reload(
    settings: Settings,
    engine: AsyncEngine,
    account: dict,
    llm: tuple[LLMStub, str],
    embedder: LocalEmbedder,
) -> None:
    """A model without tool calling that writes no [n] (the stub echoes the question): its
    sentence that says what a passage says is attributed to that passage, by similarity, live
    and on reload; the sentence that says nothing the knowledge base holds is not."""
    _, url = llm
    settings.chat = ChatSettings(
        llm_base_url=url,
        run_lease_s=1,
        models={"default": ModelSpec(base_url=url, model="echo", tools=False)},
    )
    async with serve_live(settings, embedder=embedder) as server:
        token = await sign_in(server, account)
        sent = await upload(server, token, "handbook.md", HANDBOOK)
        events = await job_events(server, token, sent["data"]["ingestDocument"]["id"])
        assert events[-1]["__typename"] == "IngestionCompleted", events
        question = (
            "Is my money refunded within two weeks once the warehouse in Lyon has my return? "
            "My cat sleeps on the sofa all afternoon."
        )
        conversation_id, run_id = await start_run(server, token, question)
        answer = await events_of(server, token, run_id)
        assert kinds(answer)[:3] == ["RunStarted", "ToolCallStarted", "ToolCallFinished"]
        assert kinds(answer)[-2:] == ["CitationAdded", "RunCompleted"], kinds(answer)
        said = text(answer)
        [live] = [e for e in answer if e["__typename"] == "CitationAdded"]
        assert said[live["answerStart"] : live["answerEnd"]].startswith("Is my money refunded")
        assert said[live["answerEnd"] - 1] == "?"
        reloaded = await gql(server, token, RELOAD, id=conversation_id)
    stored = assistant_of(reloaded)
    assert stored["content"] == said
    refunds = next(s for s in stored["sources"] if "fourteen days" in s["text"])
    assert refunds == {
        **refunds,
        "title": "Handbook",
        "heading": "Handbook > Refunds",
        "chunkId": live["chunkId"],
        "documentId": live["documentId"],
    }
    [citation] = stored["citations"]
    assert citation == {
        "index": refunds["index"],
        "chunkId": refunds["chunkId"],
        "documentId": refunds["documentId"],
        "title": "Handbook",
        "answerStart": live["answerStart"],
        "answerEnd": live["answerEnd"],
        "confidence": citation["confidence"],
        "explicit": False,
    }
    assert ChatSettings().citation_threshold <= citation["confidence"] < 1


async def test_embeddings_cost_money_and_a_spent_money_budget_refuses_ingestion_and_searches(
    settings: Settings,
    engine: AsyncEngine,
    account: dict,
    llm: tuple[LLMStub, str],
    embedder: LocalEmbedder,
) -> None:
    """Ingestion's and a search's embeddings cost their compute-seconds at the settings' price
    (here 1 per CPU-second), counted per tenant in the cost metrics and recorded as usage by
    model version; both are charged to the money budget of the asker (the job's creator),
    which stops the job that spends it (BUDGET_EXCEEDED after its first step, whose usage is
    recorded with its failure) and refuses the next upload and searches."""
    _, url = llm
    settings.chat = ChatSettings(llm_base_url=url, llm_model="tools", run_lease_s=1)
    settings.cost = CostSettings(compute_second_prices={"cpu": 1.0}, usage_flush_s=0.2)
    plan = settings.limits.default_plan
    settings.limits = settings.limits.model_copy(
        update={"budgets": {plan: {"cost": BudgetSpec(user_day=0.000001)}}}
    )
    search = "query($q: String!) { search(query: $q, k: 2) { chunkId } }"
    async with serve_live(settings, embedder=embedder) as server:
        token = await sign_in(server, account)
        sent = await upload(server, token, "handbook.md", HANDBOOK)
        events = await job_events(server, token, sent["data"]["ingestDocument"]["id"])
        assert events[-1]["__typename"] == "IngestionFailed", events
        assert events[-1]["code"] == "BUDGET_EXCEEDED"
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            ingested = (await http.get("/metrics")).text
        recorded = await embedding_usage(server, token)
        assert recorded is not None  # the failed job's, written with its end
        next_upload = await upload(server, token, "faq.md", b"# FAQ\n\nShipping takes a week.")
        refused = await gql(server, token, search, q="how are refunds paid")
        again = await gql(server, token, search, q="when does support answer")
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            searched = (await http.get("/metrics")).text
        name, version = embedder.name.split("@")
        counted = _value(searched, _cost_series(name, version, account["tenant_id"]))
        # the searches' records: the ledger's next flushes (the two searches may fall in two)
        async with asyncio.timeout(scaled(30)):
            while (await embedding_usage(server, token) or {"cost": 0})["cost"] < counted - 4e-6:
                await asyncio.sleep(0.1)
        total = await embedding_usage(server, token)
    cost = _cost_series(name, version, account["tenant_id"])
    seconds = (
        f'sightline_model_compute_seconds_total{{device="cpu",kind="embedding",model="{name}",'
        f'version="{version}"}}'
    )
    value = _value

    assert value(ingested, cost) > 0  # the document's first step of chunks
    assert value(ingested, seconds) == pytest.approx(value(ingested, cost), rel=1e-3)  # 1 per s
    assert recorded["cost"] == pytest.approx(value(ingested, cost), abs=2e-6)
    assert (recorded["model"], recorded["version"]) == (name, version)
    assert value(searched, cost) > value(ingested, cost)  # and the query
    assert total is not None
    assert total["cost"] == pytest.approx(value(searched, cost), abs=4e-6)
    for answer in (next_upload, refused, again):
        [error] = answer["errors"]
        assert error["extensions"]["code"] == "BUDGET_EXCEEDED"
        assert error["extensions"]["resource"] == "cost"


def _cost_series(name: str, version: str, tenant_id: object) -> str:
    return (
        f'sightline_model_cost_total{{kind="embedding",model="{name}",'
        f'tenant="{tenant_id}",version="{version}"}}'
    )


def _value(exposition: str, series: str) -> float:
    [line] = [x for x in exposition.splitlines() if x.startswith(series + " ")]
    return float(line.split()[-1])


async def embedding_cost(server: LiveServer, tenant_id: object, model: str) -> float:
    """What the server's cost metric counts for the tenant's embeddings by `model@version`."""
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        exposition = (await http.get("/metrics")).text
    name, version = model.split("@")
    return _value(exposition, _cost_series(name, version, tenant_id))


async def embedding_usage(server: LiveServer, token: str) -> dict[str, Any] | None:
    """Today's embedding usage of the tenant (`usage(byModel: true)`), None when there is none."""
    answer = await gql(
        server, token, "{ usage(days: 1, byModel: true) { resource model version kind cost } }"
    )
    assert "errors" not in answer, answer
    rows = [r for r in answer["data"]["usage"] if r["kind"] == "embedding"]
    assert len(rows) <= 1, rows
    if not rows:
        return None
    assert rows[0]["resource"] == "compute_seconds"
    return {**rows[0], "cost": float(rows[0]["cost"])}


async def test_an_ingestion_job_records_its_embeddings_with_its_end(
    settings: Settings,
    engine: AsyncEngine,
    account: dict,
    llm: tuple[LLMStub, str],
    embedder: LocalEmbedder,
) -> None:
    """A completed job's embeddings are one usage record, written in the transaction that
    stores its document (so `usage` shows them as soon as the job ends), charged to the money
    budget of its creator."""
    _, url = llm
    settings.chat = ChatSettings(llm_base_url=url, llm_model="tools", run_lease_s=1)
    settings.cost = CostSettings(compute_second_prices={"cpu": 1.0}, usage_flush_s=3600)
    async with serve_live(settings, embedder=embedder) as server:
        token = await sign_in(server, account)
        sent = await upload(server, token, "handbook.md", HANDBOOK)
        events = await job_events(server, token, sent["data"]["ingestDocument"]["id"])
        assert events[-1]["__typename"] == "IngestionCompleted", events
        recorded = await embedding_usage(server, token)
        counted = await embedding_cost(server, account["tenant_id"], embedder.name)
    assert recorded is not None
    assert recorded["cost"] == pytest.approx(counted, abs=2e-6)
    assert recorded["cost"] > 0
    assert f"{recorded['model']}@{recorded['version']}" == embedder.name
