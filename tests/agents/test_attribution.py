"""Citations attributed by similarity when the model writes no [n]: sentences split with their
offsets, the real knowledge base (PostgreSQL, MiniLM) deciding which source a sentence draws on,
and a turn whose attribution fails or hangs still ending, with no citations."""

from __future__ import annotations

import asyncio

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.agents.attribution import attribute, sentences
from backend.agents.tools import AgentTools
from backend.auth.principal import Principal
from backend.config import ChatSettings, ModelSpec, Settings
from backend.core.db import Database
from backend.core.models import Message
from backend.knowledge.service import KnowledgeService
from tests.agents.test_agent import (  # noqa: F401
    Knowledge,
    events_of,
    kinds,
    knowledge,
    tenant_session,
    with_chat,
)
from tests.agents.test_agent import text as answer_of
from tests.agents.test_runs import sign_in, start_run
from tests.conftest import serve_live
from tests.knowledge.test_service import (  # noqa: F401 (fixtures)
    database,
    finished,
    kb,
    new_principal,
)
from tests.llm_stub import LLMStub

FACTS = b"""# Company facts

## Refunds

Refunds are paid within fourteen days of the returned parcel reaching our warehouse in Lyon.

## Office

The head office moved to a converted brewery in Ghent in 2019; it has a rooftop garden.

## Security

Every laptop is encrypted with a hardware key, and passwords rotate every ninety days.
"""


def test_sentences_keep_their_offsets_and_skip_what_says_nothing() -> None:
    answer = "Sure. Version 3.5 ships on example.com today!\n\nIt costs 12 euros a month?  Yes."
    found = sentences(answer, limit=10)
    assert [s.text for s in found] == [
        "Version 3.5 ships on example.com today!",
        "It costs 12 euros a month?",
    ]
    assert all(answer[s.start : s.end] == s.text for s in found)
    assert [s.text for s in sentences("One two three. Four five six. Seven eight nine.", 2)] == [
        "One two three.",
        "Four five six.",
    ]
    assert sentences("", 5) == []
    assert [s.text for s in sentences("no full stop at the end", 5)] == ["no full stop at the end"]


async def test_a_paraphrased_fact_is_attributed_to_its_source_and_an_unrelated_one_is_not(
    kb: KnowledgeService,  # noqa: F811
    database: Database,  # noqa: F811
) -> None:
    principal = await new_principal(database)
    job = await kb.ingest(principal, FACTS, filename="facts.md", source="facts.md")
    assert (await finished(kb, principal, job.id))["types"][-1] == "IngestionCompleted"
    hits = await kb.search_knowledge(principal, "refunds office laptops", 4)
    sources = [
        {
            "n": n,
            "chunk_id": h.chunk_id,
            "document_id": h.document_id,
            "title": h.title,
            "text": h.text,
            "span": h.span,
        }
        for n, h in enumerate(hits, start=1)
    ]
    by_topic = {
        topic: next(s for s in sources if topic in s["text"])
        for topic in ("Refunds", "Ghent", "laptop")
    }
    answer = (
        "You get your money back two weeks after the warehouse receives what you sent. "
        "Penguins huddle together to survive the Antarctic winter."
    )
    threshold = ChatSettings().citation_threshold
    cited = await attribute(
        principal, answer, sources, kb.similarities, threshold=threshold, max_sentences=64
    )
    assert len(cited) == 1, cited
    [citation] = cited
    assert citation["index"] == by_topic["Refunds"]["n"]
    assert citation["chunkId"] == by_topic["Refunds"]["chunk_id"]
    assert citation["confidence"] >= threshold
    assert citation["explicit"] is False
    assert answer[citation["answerStart"] : citation["answerEnd"]].startswith("You get your money")
    assert answer[citation["answerEnd"] - 1] == "."

    # the office sentence goes to the office, not to the refunds
    office = "Our headquarters are in an old brewery in Ghent with a garden on the roof."
    [moved] = await attribute(
        principal, office, sources, kb.similarities, threshold=threshold, max_sentences=64
    )
    assert moved["index"] == by_topic["Ghent"]["n"]

    # another tenant's chunks are not compared: the same ids give it nothing
    stranger = await new_principal(database)
    assert await kb.similarities(stranger, [office], [s["chunk_id"] for s in sources]) == [{}]
    assert await kb.similarities(principal, [office], ["not-a-uuid"]) == [{}]


async def test_a_turn_whose_attribution_fails_or_hangs_ends_without_citations(
    settings: Settings,
    engine: AsyncEngine,
    account: dict,
    llm: tuple[LLMStub, str],
    knowledge: Knowledge,  # noqa: F811
) -> None:
    _, url = llm
    with_chat(
        settings,
        url,
        llm_model="echo",
        models={"default": ModelSpec(base_url=url, model="echo", tools=False)},
        citation_timeout_s=0.5,
    )
    asked: list[list[str]] = []

    async def similar(
        principal: Principal, texts: list[str], chunk_ids: list[str]
    ) -> list[dict[str, float]]:
        asked.append(chunk_ids)
        if texts[0].startswith("refunds hang"):
            await asyncio.sleep(3600)
        if texts[0].startswith("refunds fail"):
            raise RuntimeError("the embedder broke")
        return [{"c2": 0.2, "c1": 0.9} for _ in texts]

    tools = AgentTools(search_knowledge=knowledge, similarity=similar)
    async with serve_live(settings, agent_tools=tools) as server:
        token = await sign_in(server, account)
        ended = {}
        for content in ("refunds hang for a while", "refunds fail right away", "refunds take long"):
            conversation, run_id = await start_run(server, token, content)
            ended[content] = (conversation, await events_of(server, token, run_id))
    assert asked == [["c1", "c2"]] * 3
    for content in ("refunds hang for a while", "refunds fail right away"):
        events = ended[content][1]
        assert kinds(events)[-1] == "RunCompleted", events
        assert "CitationAdded" not in kinds(events)
        assert answer_of(events) == content + " "
    attributed = ended["refunds take long"][1]
    assert kinds(attributed)[-2:] == ["CitationAdded", "RunCompleted"]
    citation = next(e for e in attributed if e["__typename"] == "CitationAdded")
    assert citation == {**citation, "index": 1, "chunkId": "c1", "answerStart": 0, "answerEnd": 17}
    # stored with the answer (what Message.citations reads on reload)
    async with tenant_session(engine, settings, account) as session:
        stored = await session.scalar(
            select(Message).where(
                Message.conversation_id == ended["refunds take long"][0], Message.seq == 2
            )
        )
    assert stored is not None
    [kept] = stored.meta["citations"]
    assert kept == {**kept, "index": 1, "chunkId": "c1", "confidence": 0.9, "explicit": False}
