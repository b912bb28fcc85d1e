"""One trace per chat turn and per vision job: the span tree a live server records (the SDK's
in-memory exporter), under the request that started the work."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from skimage import data
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.agents.graph import TTFT_MS
from backend.agents.tools import AgentTools
from backend.config import Settings
from backend.core.telemetry import MODEL, MODEL_VERSION, TENANT
from tests.agents.test_agent import Knowledge, with_chat
from tests.agents.test_runs import collect, sign_in, start_run
from tests.conftest import serve_live
from tests.llm_stub import LLMStub
from tests.vision.test_graphql import analyse, jpeg, vision_on


def children_of(parent: ReadableSpan, spans: Sequence[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans if s.parent is not None and s.parent.span_id == parent.span_id}


def parent_of(span: ReadableSpan, spans: Sequence[ReadableSpan]) -> ReadableSpan:
    assert span.parent is not None
    [parent] = [s for s in spans if s.context.span_id == span.parent.span_id]
    return parent


async def test_a_chat_turn_is_a_trace_of_its_steps_under_the_request_that_sent_it(
    settings: Settings,
    engine: AsyncEngine,
    account: dict[str, Any],
    llm: tuple[LLMStub, str],
) -> None:
    spans = InMemorySpanExporter()
    async with serve_live(
        with_chat(settings, llm[1], llm_model="tools"),  # it searches the knowledge base
        span_processors=[SimpleSpanProcessor(spans)],
        agent_tools=AgentTools(search_knowledge=Knowledge()),
    ) as server:
        token = await sign_in(server, account)
        _, run_id = await start_run(server, token, "how long do refunds take")
        events = await collect(server, token, run_id)
    assert events[-1]["__typename"] == "RunCompleted"
    finished = spans.get_finished_spans()  # the server has stopped: every turn has ended

    [turn] = [s for s in finished if s.name == "chat.turn"]
    assert turn.attributes is not None
    assert turn.attributes[MODEL] == "tools"
    assert turn.attributes[MODEL_VERSION] == "1"
    assert turn.attributes[TENANT] == str(account["tenant_id"])
    assert turn.attributes["sightline.run_id"] == run_id
    assert turn.attributes["sightline.chat.outcome"] == "completed"
    # run in a background task, yet parented to the sendMessage request's operation
    request = parent_of(turn, finished)
    assert request.name.startswith("graphql.mutation")
    assert request.context.trace_id == turn.context.trace_id
    assert parent_of(request, finished).name == "HTTP POST /graphql"

    steps = children_of(turn.context, finished)  # of two model calls: the answer's
    assert {
        "guardrails.input",
        "knowledge.retrieve",
        "llm.call",
        "guardrails.output",
        "chat.persist",
    } <= set(steps)
    order = ["guardrails.input", "knowledge.retrieve", "llm.call", "chat.persist"]
    starts = [steps[name].start_time or 0 for name in order]
    assert starts == sorted(starts)
    assert steps["knowledge.retrieve"].attributes == {"sightline.knowledge.results": 2}
    assert steps["guardrails.input"].attributes == {
        "sightline.guardrails.blocked": False,
        "sightline.guardrails.decisions": 0,
    }

    call = steps["llm.call"]
    assert call.attributes is not None
    assert call.attributes[MODEL] == "tools"
    assert call.attributes[MODEL_VERSION] == "1"
    ttft = call.attributes[TTFT_MS]
    assert isinstance(ttft, float)
    assert ttft > 0
    [first] = [e for e in call.events if e.name == "first_token"]
    assert call.start_time is not None
    assert first.timestamp >= call.start_time
    # the answer's statements are the persist step's children
    stored = children_of(steps["chat.persist"].context, finished)
    assert any(name.startswith("db ") for name in stored)


async def test_a_vision_job_is_a_trace_of_validation_queue_wait_and_batch(
    chat_settings: Settings, engine: AsyncEngine, account: dict[str, Any]
) -> None:
    spans = InMemorySpanExporter()
    async with serve_live(
        vision_on(chat_settings), span_processors=[SimpleSpanProcessor(spans)]
    ) as server:
        token = await sign_in(server, account)
        events = await analyse(server, token, jpeg(data.chelsea()), ["CLASSIFY"])
    assert events[-1]["__typename"] == "VisionJobCompleted"
    finished = spans.get_finished_spans()

    [job] = [s for s in finished if s.name == "vision.job"]
    assert job.attributes is not None
    assert job.attributes[TENANT] == str(account["tenant_id"])
    assert job.attributes[MODEL] == "efficientnet-lite0"
    assert job.attributes[MODEL_VERSION]
    request = parent_of(job, finished)
    assert request.name.startswith("graphql.mutation")

    steps = children_of(job.context, finished)
    assert {"vision.validate", "inference.queue_wait", "inference.batch"} <= set(steps)
    wait, batch = steps["inference.queue_wait"], steps["inference.batch"]
    assert wait.attributes is not None
    assert batch.attributes is not None
    assert wait.attributes[MODEL] == batch.attributes[MODEL] == "efficientnet-lite0"
    assert batch.attributes["sightline.inference.batch_size"] == 1
    assert batch.attributes["sightline.inference.compute_ms"] > 0
    # the pool's timings, one after the other, inside the job
    assert job.start_time is not None
    assert job.end_time is not None
    validated = steps["vision.validate"]
    assert validated.end_time is not None
    assert wait.start_time is not None
    assert wait.end_time is not None
    assert batch.start_time is not None
    assert batch.end_time is not None
    assert job.start_time <= validated.end_time <= wait.start_time
    assert wait.start_time <= wait.end_time <= batch.start_time + 1_000  # same reading (ns)
    assert batch.start_time <= batch.end_time <= job.end_time


async def test_with_nowhere_to_send_spans_nothing_is_recorded(
    chat_settings: Settings, engine: AsyncEngine, account: dict[str, Any]
) -> None:
    async with serve_live(chat_settings) as server:  # no endpoint, no processor: tracing off
        token = await sign_in(server, account)
        _, run_id = await start_run(server, token, "hello")
        events = await collect(server, token, run_id)
        tracer = server.state["sightline"].tracer_provider.get_tracer("test")
        with tracer.start_as_current_span("probe") as span:
            assert not span.is_recording()
            assert span.get_span_context().is_valid  # logs still carry a trace id
    assert events[-1]["__typename"] == "RunCompleted"
