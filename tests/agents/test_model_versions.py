"""Chat aliases as versioned registry models: a snapshot loads versions (each its own endpoint),
`alias@version` pins one, the router picks one otherwise, and the version that served is on the
run, its events, the stored answer, the metrics and the OpenAI response. Two versions of one
alias point at two LLM stubs that answer differently, so the answer shows which one served."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.agents.models import SEED_VERSION, ModelRegistry, alias_specs
from backend.config import ChatSettings, Settings
from backend.errors import ValidationFailed
from backend.inference.llm.base import ChatMessage
from backend.lifecycle.policy import (
    Arm,
    ModelKind,
    ModelVersionRecord,
    RegistrySnapshot,
    RequestKey,
    Route,
    RouteReason,
    StickyKey,
    TrafficPolicy,
    VersionStatus,
    pick_arm,
    shadow_sampled,
)
from tests.agents.test_runs import collect, gql, sign_in, text_of
from tests.conftest import LiveServer, scaled, serve_asgi, serve_live
from tests.graphql.ws import init, open_socket, receive, subscribe
from tests.llm_stub import LLMStub
from tests.openai_api.test_openai_api import api_key, sdk

# version 2's stub says every word three times: its answers are told apart from version 1's
REPEATS = 3


@pytest.fixture
async def second_llm() -> AsyncIterator[tuple[LLMStub, str]]:
    stub = LLMStub(tokens_per_s=200, answer_tokens=REPEATS)
    async with serve_asgi(stub.app) as port:
        yield stub, f"http://127.0.0.1:{port}/v1"


def record(version: str, url: str, status: VersionStatus, **spec: Any) -> ModelVersionRecord:
    return ModelVersionRecord(
        model="default",
        version=version,
        kind=ModelKind.CHAT,
        task="chat",
        status=status,
        spec={"base_url": url, "model": "echo", **spec},
    )


def snapshot(
    first: str, second: str, *, revision: int = 1, weights: tuple[float, float] = (100, 0)
) -> RegistrySnapshot:
    """Version 1 live on the first stub, 2 a canary on the second, 3 registered (not loaded).
    Its revision is far above the shared test database's registry (whose snapshots the live
    server's watcher also applies: other tests' servers seed other aliases there), so the test's
    snapshots are the newest the chat models see."""
    return RegistrySnapshot(
        versions={
            "default": (
                record("1", first, VersionStatus.LIVE),
                record("2", second, VersionStatus.CANARY, prompt_price_per_1k=1.0),
                record("3", second, VersionStatus.REGISTERED),
            )
        },
        policies={
            "default": TrafficPolicy(
                "default", (Arm("1", weights[0]), Arm("2", weights[1])), sticky=StickyKey.USER
            )
        },
        revision=TEST_REVISIONS + revision,
    )


TEST_REVISIONS = 10**12


class PolicyRouter:
    """The test's stand-in for the lifecycle router: the same precedence, from policy.py."""

    def __init__(self, snapshot: RegistrySnapshot) -> None:
        self.snapshot = snapshot
        self.asked: list[tuple[str, RequestKey, str | None]] = []

    def route(self, model: str, key: RequestKey, explicit: str | None) -> Route:
        self.asked.append((model, key, explicit))
        if explicit is not None:
            return Route(model, explicit, RouteReason.REQUEST_PIN)
        policy = self.snapshot.policies[model]
        arm = pick_arm(policy, key.of(policy.sticky))
        shadow = policy.shadow if shadow_sampled(policy, key.request_id) else None
        return Route(model, arm, RouteReason.POLICY, shadow if shadow != arm else None)


SEND = """mutation($c: ID!, $m: String!, $model: String) {
  sendMessage(conversationId: $c, content: $m, model: $model) {
    run { id model modelAlias modelVersion } } }"""
STARTED = """subscription($r: ID!) { runEvents(runId: $r) {
  __typename ... on RunStarted { model modelAlias modelVersion } ... on TokenDelta { text } } }"""
HISTORY = """query($c: ID!) { conversation(id: $c) { messages { edges { node {
  role content model { alias name version } } } } } }"""


@dataclass
class Chat:
    """A live server on the first stub, a signed-in member and a conversation of theirs."""

    server: LiveServer
    token: str
    conversation: str
    urls: tuple[str, str]  # the two stubs

    @property
    def registry(self) -> ModelRegistry:
        return self.server.services.runs.models

    async def ask(self, content: str, model: str | None) -> dict[str, Any]:
        return await gql(self.server, self.token, SEND, c=self.conversation, m=content, model=model)

    async def load_versions(self) -> None:
        await self.registry.apply(snapshot(*self.urls))


@pytest.fixture
async def chat(
    chat_settings: Settings,
    engine: AsyncEngine,
    account: dict[str, Any],
    llm: tuple[LLMStub, str],
    second_llm: tuple[LLMStub, str],
) -> AsyncIterator[Chat]:
    async with serve_live(chat_settings) as server:
        token = await sign_in(server, account)
        created = await gql(server, token, 'mutation { createConversation(title: "v") { id } }')
        conversation = created["data"]["createConversation"]["id"]
        yield Chat(server, token, conversation, (llm[1], second_llm[1]))


async def test_a_pinned_version_serves_and_is_recorded_everywhere(
    chat: Chat, second_llm: tuple[LLMStub, str]
) -> None:
    server, token = chat.server, chat.token
    # before any snapshot: the configured alias is version 1 of itself
    sent = await chat.ask("hello", None)
    assert sent["data"]["sendMessage"]["run"]["modelVersion"] == SEED_VERSION
    await collect(server, token, sent["data"]["sendMessage"]["run"]["id"])

    await chat.load_versions()
    models = await gql(server, token, "{ chatModels { alias version versions } }")
    assert models["data"]["chatModels"] == [
        {"alias": "default", "version": "1", "versions": ["1", "2"]}
    ]

    sent = await chat.ask("hello", "default@2")
    assert "errors" not in sent, sent
    run = sent["data"]["sendMessage"]["run"]
    assert (run["modelAlias"], run["modelVersion"]) == ("default", "2")
    events = await collect(server, token, run["id"])
    assert text_of(events) == "hello " * REPEATS  # the second stub answered
    assert second_llm[0].calls == 1
    stored = await gql(
        server,
        token,
        "query($r: ID!) { run(id: $r) { status modelAlias modelVersion } }",
        r=run["id"],
    )
    assert stored["data"]["run"] == {
        "status": "COMPLETED",
        "modelAlias": "default",
        "modelVersion": "2",
    }

    # unpinned: the policy's live arm (100%) on the first stub
    sent = await chat.ask("hello", "default")
    unpinned = sent["data"]["sendMessage"]["run"]
    assert unpinned["modelVersion"] == "1"
    assert text_of(await collect(server, token, unpinned["id"])) == "hello "

    history = await gql(server, token, HISTORY, c=chat.conversation)
    nodes = [e["node"] for e in history["data"]["conversation"]["messages"]["edges"]]
    assert [n["model"] for n in nodes if n["role"] == "ASSISTANT"] == [
        {"alias": "default", "name": "echo", "version": "1"},
        {"alias": "default", "name": "echo", "version": "2"},
        {"alias": "default", "name": "echo", "version": "1"},
    ]
    assert [n["model"] for n in nodes if n["role"] == "USER"] == [None, None, None]

    async with httpx.AsyncClient(base_url=server.http_url) as http:
        metrics = (await http.get("/metrics")).text
    for version, runs in (("2", 1), ("1", 2)):
        sample = f'model="echo",outcome="completed",version="{version}"}} {runs}.0'
        assert f"sightline_chat_runs_total{{{sample}" in metrics


async def test_run_started_names_the_version(chat: Chat) -> None:
    await chat.load_versions()
    sent = await chat.ask("hi", "default@2")
    async with await open_socket(chat.server.ws_url) as ws:
        await init(ws, {"authorization": f"Bearer {chat.token}"})
        await subscribe(ws, STARTED, {"r": sent["data"]["sendMessage"]["run"]["id"]})
        first = await receive(ws, timeout=scaled(60))
    assert first["payload"]["data"]["runEvents"] == {
        "__typename": "RunStarted",
        "model": "echo",
        "modelAlias": "default",
        "modelVersion": "2",
    }
    await collect(chat.server, chat.token, sent["data"]["sendMessage"]["run"]["id"])


async def test_an_unknown_or_unloaded_version_is_bad_user_input_naming_the_loaded_ones(
    chat: Chat, second_llm: tuple[LLMStub, str]
) -> None:
    sent = await chat.ask("hello", "default@2")  # no snapshot yet
    error = sent["errors"][0]
    assert error["extensions"]["code"] == "BAD_USER_INPUT"
    assert "available: 1" in error["message"]

    await chat.load_versions()
    for version in ("3", "9"):  # registered but not loaded; never registered
        sent = await chat.ask("hello", f"default@{version}")
        error = sent["errors"][0]
        assert error["extensions"]["code"] == "BAD_USER_INPUT", sent
        assert error["message"] == (
            f"unknown version {version!r} of model 'default'; available: 1, 2"
        )
        assert error["extensions"]["versions"] == ["1", "2"]
    unknown = await chat.ask("hello", "nope@1")
    assert unknown["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    assert second_llm[0].calls == 0  # nothing refused reached a model

    sent = await chat.ask("hello", "default@")  # an empty version is no pin: the alias
    assert sent["data"]["sendMessage"]["run"]["modelVersion"] == "1"
    await collect(chat.server, chat.token, sent["data"]["sendMessage"]["run"]["id"])


async def test_openai_completions_pin_a_version_and_name_it(
    chat: Chat, account: dict[str, Any]
) -> None:
    await chat.load_versions()
    client = sdk(chat.server, await api_key(chat.server, account, "chat"))
    messages: Any = [{"role": "user", "content": "hello"}]
    pinned = await client.chat.completions.create(model="default@2", messages=messages)
    assert pinned.choices[0].message.content == "hello " * REPEATS
    assert pinned.model == "default@2"
    routed = await client.chat.completions.create(model="default", messages=messages)
    assert (routed.choices[0].message.content, routed.model) == ("hello ", "default@1")
    stream = await client.chat.completions.create(model="default@2", messages=messages, stream=True)
    chunks = [chunk async for chunk in stream]
    assert {c.model for c in chunks} == {"default@2"}
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model="default@3", messages=messages)
    assert "available: 1, 2" in refused.value.message
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope@1", messages=messages)


async def test_the_router_picks_sticky_versions_and_sees_who_asks(
    llm: tuple[LLMStub, str], second_llm: tuple[LLMStub, str]
) -> None:
    registry = await ModelRegistry.from_settings(ChatSettings(llm_base_url=llm[1]))
    try:
        routes = snapshot(llm[1], second_llm[1], weights=(50, 50))
        await registry.apply(routes)
        registry.router = router = PolicyRouter(routes)
        users = [RequestKey(tenant_id="t", user_id=f"user-{n}") for n in range(40)]
        first = [registry.resolve("default", key).version for key in users]
        assert set(first) == {"1", "2"}  # both arms serve
        assert [registry.resolve(None, key).version for key in users] == first  # sticky
        assert registry.resolve("default@2", users[0]).version == "2"
        assert router.asked[-1] == ("default", users[0], "2")
        with pytest.raises(ValidationFailed):
            registry.resolve("default@3", users[0])  # refused before the router is asked
        assert router.asked[-1][2] == "2"

        # a shadow at 50%: about half the requests of live users are mirrored to version 2
        mirrored = replace(
            routes.policies["default"], arms=(Arm("1", 100),), shadow="2", shadow_rate=0.5
        )
        router.snapshot = replace(routes, policies={"default": mirrored})
        keys = [RequestKey("t", "u", request_id=str(n)) for n in range(40)]
        shadows = [registry.shadow_for("default", key) for key in keys]
        assert {s.version for s in shadows if s is not None} == {"2"}
        assert 0 < sum(s is not None for s in shadows) < 40
        assert [registry.shadow_for("default", k) for k in keys] == shadows  # by request
        assert registry.shadow_for("default@1", keys[0]) is None  # a pinned request: none
    finally:
        await registry.aclose()


async def test_a_retired_version_drains_before_it_closes(
    llm: tuple[LLMStub, str], second_llm: tuple[LLMStub, str]
) -> None:
    slow = LLMStub(tokens_per_s=20, answer_tokens=20)
    async with serve_asgi(slow.app) as port:
        slow_url = f"http://127.0.0.1:{port}/v1"
        registry = await ModelRegistry.from_settings(ChatSettings(llm_base_url=llm[1]))
        try:
            await registry.apply(snapshot(llm[1], slow_url))
            held = registry.checkout("default@2")
            stream = held.provider.stream(
                [ChatMessage("user", "go")], max_tokens=50, sampling=held.greedy
            )
            pieces = [(await anext(stream)).text]  # type: ignore[call-overload]

            # version 2 is retired while its answer streams: no new request reaches it...
            retired = RegistrySnapshot(
                versions={"default": (record("1", llm[1], VersionStatus.LIVE),)},
                policies={"default": TrafficPolicy("default", (Arm("1", 100),))},
                revision=TEST_REVISIONS + 2,
            )
            await registry.apply(retired)
            with pytest.raises(ValidationFailed, match=r"available: 1$"):
                registry.resolve("default@2")
            assert [m.version for m in registry.versions("default")] == ["1"]
            # ...and the one going finishes on it, not cut
            async for chunk in stream:  # type: ignore[attr-defined]
                pieces.append(chunk.text)
            assert "".join(pieces) == "go " * 20
            assert slow.closed_early == 0
            assert registry.find("default", "2") is held  # draining: its prices still known
            assert registry.hold(held)  # a request routed just before the switch

            registry.release(held)
            registry.release(held)  # the last hold: closed in the background
            await asyncio.sleep(0)
            await registry.aclose()  # waits for the closing
            assert registry.find("default", "2") is None
            assert not registry.hold(held)  # closed: whoever resolved it routes again

            # a stale snapshot (an older revision) changes nothing
            await registry.apply(snapshot(llm[1], second_llm[1], revision=1))
            assert [m.version for m in registry.versions("default")] == ["1"]
        finally:
            await registry.aclose()


async def test_versions_on_one_endpoint_share_a_client_and_a_bad_spec_is_left_out(
    llm: tuple[LLMStub, str], second_llm: tuple[LLMStub, str]
) -> None:
    registry = await ModelRegistry.from_settings(
        ChatSettings(llm_base_url=llm[1], llm_model="echo")
    )
    try:
        configured = registry.resolve(None)
        await registry.apply(
            RegistrySnapshot(
                versions={
                    "default": (
                        record("1", llm[1], VersionStatus.LIVE),
                        record("2", llm[1], VersionStatus.CANARY, temperature=0.1),
                        record("4", llm[1], VersionStatus.READY, temperature=9.0),  # invalid
                        record("5", llm[1], VersionStatus.LOADING),  # not ready everywhere
                    )
                },
                revision=1,
            )
        )
        one, two = registry.versions("default")
        assert (one.version, two.version) == ("1", "2")
        assert one.provider is two.provider is configured.provider
        assert two.sampling.temperature == 0.1
        assert registry.resolve(None).version == "1"  # the live one, with no policy
        for unready in ("4", "5"):
            with pytest.raises(ValidationFailed):
                registry.resolve(f"default@{unready}")
        assert list(registry.failures) == ["default@4"]
        assert "temperature" in registry.failures["default@4"]
        # every version retired: the configured alias serves again
        await registry.apply(RegistrySnapshot(versions={}, revision=2))
        assert registry.resolve(None) is configured
    finally:
        await registry.aclose()


async def test_a_seeded_alias_builds_back_the_same_model_and_the_router_sees_it(
    llm: tuple[LLMStub, str],
) -> None:
    chat = ChatSettings(llm_base_url=llm[1], llm_model="echo", temperature=0.2)
    registry = await ModelRegistry.from_settings(chat)
    try:
        configured = registry.resolve(None)
        # what the registry is seeded with at start: version 1, the settings' spec as JSON
        spec = alias_specs(chat)["default"].model_dump(mode="json")
        seeded = ModelVersionRecord(
            "default", SEED_VERSION, ModelKind.CHAT, "chat", VersionStatus.LIVE, spec
        )
        await registry.apply(RegistrySnapshot(versions={"default": (seeded,)}, revision=1))
        # the alias's own version is the settings' model, whatever the registry's record of it
        # says (seeded by whichever replica started first, maybe before the settings changed)
        assert registry.resolve(None) is configured
        stale = ModelVersionRecord(
            "default",
            SEED_VERSION,
            ModelKind.CHAT,
            "chat",
            VersionStatus.LIVE,
            {**spec, "base_url": "http://127.0.0.1:9/v1"},  # an endpoint long gone
        )
        await registry.apply(RegistrySnapshot(versions={"default": (stale,)}, revision=2))
        served = registry.resolve(None)
        assert served is configured
        assert served.version == SEED_VERSION
        assert await registry.complete("default@1", [ChatMessage("user", "yes")]) == "yes "

        await registry.apply(snapshot(llm[1], llm[1], revision=2))
        assert registry.local_versions("default") == ["1", "2"]  # the default first
        assert registry.is_ready("default", "2")
        assert not registry.is_ready("default", "3")  # registered, not loaded
        assert registry.local_versions("nope") == []
    finally:
        await registry.aclose()


async def test_every_served_answer_is_told_to_the_statistics_by_version(
    chat: Chat, account: dict[str, Any]
) -> None:
    told: list[tuple[str, str, dict[str, Any]]] = []

    def record_served(model: str, version: str, **figures: Any) -> None:
        told.append((model, version, figures))

    services = chat.server.services
    assert services.openai is not None
    services.runs.served = services.openai.served = record_served
    await chat.load_versions()
    sent = await chat.ask("one two", "default@2")
    await collect(chat.server, chat.token, sent["data"]["sendMessage"]["run"]["id"])
    client = sdk(chat.server, await api_key(chat.server, account, "chat"))
    await client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "three"}]
    )
    assert [(m, v, f["ok"], f["tokens"]) for m, v, f in told] == [
        ("default", "2", True, REPEATS),  # the second stub answers REPEATS words
        ("default", "1", True, 1),
    ]
    assert told[0][2]["cost"] > 0  # version 2's prompt price
    assert all(f["latency_s"] > 0 for _, _, f in told)
