"""The registry over GraphQL: an operator registers versions, splits traffic, promotes and
rolls back; refused changes are typed errors; a tenant admin reads and pins for the tenant;
a member reads nothing. The app's own replica follows every change."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi import FastAPI
from httpx import AsyncClient

from backend.config import Settings
from backend.core.models import UserRole
from backend.knowledge.embeddings import LOCAL_NAME
from backend.lifecycle.policy import split_pin
from backend.services import Services
from tests.accounts import PASSWORD, Account, sign_in
from tests.conftest import scaled

OPERATORS = "operators"

VERSION = "model version status notes registeredBy spec"
POLICY = "revision live sticky shadow shadowRate arms { version weight } canary { minRequests }"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    privacy = settings.privacy.model_copy(update={"operator_tenant": OPERATORS})
    return settings.model_copy(update={"privacy": privacy})


@pytest.fixture
async def operator(client: AsyncClient, services: Services) -> Account:
    tenant = await services.auth.ensure_tenant(OPERATORS, "Platform operators")
    email = f"ops@{OPERATORS}.example"
    await services.auth.create_user(
        tenant_id=tenant.id, email=email, password=PASSWORD, role=UserRole.OWNER
    )
    return await sign_in(client, tenant, email)


async def call(
    client: AsyncClient, services: Services, account: Account, query: str, **variables: Any
) -> dict[str, Any]:
    """One operation; then waits until the app's replica has taken in what it changed (its
    reload shares the test's one connection with the next request)."""
    response = await client.post(
        "/graphql", json={"query": query, "variables": variables}, headers=account.headers
    )
    assert services.models_watcher is not None
    assert services.registry is not None
    assert await services.models_watcher.wait_for(services.registry.last_revision, scaled(20))
    return response.json()


def code(body: dict[str, Any]) -> str:
    return body["errors"][0]["extensions"]["code"]


REGISTER = f"""
mutation ($model: String!, $version: String!, $spec: JSON!, $kind: ModelKind) {{
  registerModelVersion(model: $model, version: $version, spec: $spec, kind: $kind,
                       notes: "from the test") {{ {VERSION} }}
}}"""
SET_POLICY = f"""
mutation ($model: String!, $arms: [TrafficArmInput!]!, $shadow: String, $rate: Float) {{
  setTrafficPolicy(model: $model, arms: $arms, shadow: $shadow, shadowRate: $rate,
                   canary: {{minRequests: 20}}) {{ {POLICY} }}
}}"""
MODEL = f"""
query ($name: String!) {{
  model(name: $name) {{ name kind task versions {{ version status }} policy {{ {POLICY} }}
                       pins {{ tenantId version }} }}
}}"""


async def test_an_operator_runs_a_model_through_its_lifecycle(
    app: FastAPI, client: AsyncClient, services: Services, operator: Account
) -> None:
    spec = {"provider": "openai", "base_url": "http://llm.example/v1"}
    first = await call(
        client,
        services,
        operator,
        REGISTER,
        model="scribe",
        version="1",
        spec=spec,
        kind="CHAT",
    )
    assert first["data"]["registerModelVersion"]["status"] == "READY", first
    assert first["data"]["registerModelVersion"]["registeredBy"] == str(operator.user_id)
    await call(client, services, operator, REGISTER, model="scribe", version="2", spec=spec)
    again = await call(client, services, operator, REGISTER, model="scribe", version="2", spec=spec)
    assert code(again) == "MODEL_VERSION_EXISTS"
    not_an_object = await call(
        client, services, operator, REGISTER, model="scribe", version="3", spec=[1]
    )
    assert code(not_an_object) == "BAD_USER_INPUT"

    split = await call(
        client,
        services,
        operator,
        SET_POLICY,
        model="scribe",
        arms=[{"version": "1", "weight": 90}, {"version": "2", "weight": 10}],
    )
    policy = split["data"]["setTrafficPolicy"]
    assert (policy["revision"], policy["live"], policy["sticky"]) == (1, "1", "USER")
    assert policy["canary"] == {"minRequests": 20}
    for arms, shadow, expected in (
        ([{"version": "1", "weight": 90}], None, "INVALID_TRAFFIC_POLICY"),
        ([{"version": "1", "weight": 100}], "1", "INVALID_TRAFFIC_POLICY"),
        ([{"version": "7", "weight": 100}], None, "MODEL_VERSION_NOT_FOUND"),
    ):
        refused = await call(
            client, services, operator, SET_POLICY, model="scribe", arms=arms, shadow=shadow
        )
        assert code(refused) == expected, refused
    unknown = await call(
        client,
        services,
        operator,
        SET_POLICY,
        model="nobody",
        arms=[{"version": "1", "weight": 100}],
    )
    assert code(unknown) == "MODEL_NOT_FOUND"

    promoted = await call(
        client,
        services,
        operator,
        f'mutation {{ promoteModelVersion(model: "scribe", version: "2") {{ {POLICY} }} }}',
    )
    assert promoted["data"]["promoteModelVersion"]["live"] == "2"
    shown = (await call(client, services, operator, MODEL, name="scribe"))["data"]["model"]
    assert shown["kind"] == "CHAT"
    assert {v["version"]: v["status"] for v in shown["versions"]} == {"1": "READY", "2": "LIVE"}
    rolled = await call(
        client,
        services,
        operator,
        f'mutation {{ rollbackModel(model: "scribe", reason: "drill") {{ {POLICY} }} }}',
    )
    assert [a["weight"] for a in rolled["data"]["rollbackModel"]["arms"]] == [90, 10]
    retired = await call(
        client,
        services,
        operator,
        'mutation { retireModelVersion(model: "scribe", version: "1") { status } }',
    )
    assert code(retired) == "MODEL_VERSION_IN_USE"

    # the app's replica routes by what was committed
    assert services.models_watcher is not None
    held = services.models_watcher.snapshot.policies["scribe"]
    assert [(a.version, a.weight) for a in held.arms] == [("1", 90), ("2", 10)]


async def test_tenant_admins_read_and_pin_members_do_neither(
    app: FastAPI,
    client: AsyncClient,
    services: Services,
    operator: Account,
    owner: Account,
    member: Account,
) -> None:
    spec = {"provider": "openai", "base_url": "http://llm.example/v1"}
    for version in ("1", "2"):
        await call(
            client,
            services,
            operator,
            REGISTER,
            model="helper",
            version=version,
            spec=spec,
            kind="CHAT",
        )
    await call(
        client,
        services,
        operator,
        SET_POLICY,
        model="helper",
        arms=[{"version": "1", "weight": 100}],
    )
    forbidden = await call(
        client,
        services,
        owner,
        SET_POLICY,
        model="helper",
        arms=[{"version": "2", "weight": 100}],
    )
    assert code(forbidden) == "FORBIDDEN"
    pinned = await call(
        client,
        services,
        owner,
        'mutation { pinModelVersion(model: "helper", version: "2") { tenantId version } }',
    )
    assert pinned["data"]["pinModelVersion"] == {
        "tenantId": str(owner.tenant.id),
        "version": "2",
    }
    elsewhere = await call(
        client,
        services,
        owner,
        'mutation ($t: ID) { pinModelVersion(model: "helper", version: "2", tenantId: $t) '
        "{ version } }",
        t=str(operator.tenant.id),
    )
    assert code(elsewhere) == "NOT_FOUND"  # another tenant does not exist for them
    read = await call(client, services, owner, MODEL, name="helper")
    assert read["data"]["model"]["pins"] == [{"tenantId": str(owner.tenant.id), "version": "2"}]
    assert services.models_watcher is not None
    assert services.models_watcher.snapshot.pins[(str(owner.tenant.id), "helper")] == "2"

    assert code(await call(client, services, member, MODEL, name="helper")) == "FORBIDDEN"
    assert code(await call(client, services, member, "{ models { name } }")) == "FORBIDDEN"
    member_pin = await call(
        client,
        services,
        member,
        'mutation { pinModelVersion(model: "helper", version: "1") { version } }',
    )
    assert code(member_pin) == "FORBIDDEN"
    unpinned = await call(
        client, services, owner, 'mutation { unpinModelVersion(model: "helper") }'
    )
    assert unpinned["data"]["unpinModelVersion"] is True
    missing = await call(client, services, owner, MODEL, name="nobody")
    assert code(missing) == "MODEL_NOT_FOUND"


async def test_the_app_seeds_what_it_serves(
    app: FastAPI, client: AsyncClient, services: Services, operator: Account
) -> None:
    listed = await call(client, services, operator, "{ models { name kind policy { live } } }")
    models = {m["name"]: m for m in listed["data"]["models"]}
    name, version = split_pin(LOCAL_NAME)  # the knowledge base's embedder
    assert models[name] == {"name": name, "kind": "EMBEDDING", "policy": {"live": version}}


# Written for this test: an ordinary message the packaged head lets through.
ORDINARY = "Which museums in Lisbon are open on Mondays, and do they have family tickets?"
# A head version that flags every message: no weight, a bias far above its threshold.
STRICT_HEAD = {
    "embedding_model": "all-minilm-l6-v2",
    "weights": [0.0] * 384,
    "bias": 20.0,
    "threshold": 0.5,
    "provenance": {"fitted_on": "nothing: the test's"},
}
CHECK = "query ($text: String!) { guardrailCheck(text: $text) { blocked decisions { reason } } }"
COMPARE = """query { modelComparison(model: "attack-head", window: 300) {
  versions { version role requests shadowAgreement { liveVersion compared failed
             metrics { name mean } } } } }"""


async def test_a_refitted_attack_head_runs_as_a_shadow_before_it_blocks_anyone(
    app: FastAPI, client: AsyncClient, services: Services, operator: Account
) -> None:
    """The learned injection head is a registry model (kind GUARDRAIL): the packaged head is
    seeded live; a new version runs as a shadow, its decisions compared with live's and acted
    on by nobody, until it is promoted."""
    shown = (await call(client, services, operator, MODEL, name="attack-head"))["data"]["model"]
    assert (shown["kind"], shown["task"]) == ("GUARDRAIL", "injection")
    packaged = shown["policy"]["live"]
    assert packaged.startswith("packaged-")
    turned_on = await call(
        client,
        services,
        operator,
        "mutation ($change: JSON!) { updateGuardrailPolicy(change: $change) { policy } }",
        change={"injection": {"learned": True}},
    )
    assert turned_on["data"]["updateGuardrailPolicy"]["policy"]["injection"]["learned"]

    for spec, expected in (
        ({**STRICT_HEAD, "weights": [0.0] * 10}, "INVALID_MODEL_SPEC"),  # not MiniLM's 384-d
        ({**STRICT_HEAD, "threshold": 0.0}, "INVALID_MODEL_SPEC"),
        ({**STRICT_HEAD, "base_url": "http://x"}, "INVALID_MODEL_SPEC"),
        # vectors of a model the registry has no embedding version of: it could never serve
        ({**STRICT_HEAD, "embedding_model": "bge-small-en"}, "INVALID_MODEL_SPEC"),
    ):
        refused = await call(
            client, services, operator, REGISTER, model="attack-head", version="bad", spec=spec
        )
        assert code(refused) == expected, refused
    registered = await call(
        client,
        services,
        operator,
        REGISTER,
        model="attack-head",
        version="strict",
        spec=STRICT_HEAD,
    )
    assert registered["data"]["registerModelVersion"]["status"] == "READY", registered
    shadowed = await call(
        client,
        services,
        operator,
        """mutation ($live: String!) { setTrafficPolicy(model: "attack-head", shadow: "strict",
             shadowRate: 1.0, arms: [{version: $live, weight: 100}]) { shadow } }""",
        live=packaged,
    )
    assert shadowed["data"]["setTrafficPolicy"]["shadow"] == "strict", shadowed

    for _ in range(2):  # the shadow flags the message; live lets it through, and live decides
        checked = await call(client, services, operator, CHECK, text=ORDINARY)
        assert checked["data"]["guardrailCheck"] == {"blocked": False, "decisions": []}
    lifecycle = services.lifecycle
    assert lifecycle is not None
    for _ in range(200):
        if lifecycle.shadows.in_flight == 0:
            break
        await asyncio.sleep(scaled(0.05))
    await lifecycle.flush()
    versions = {
        v["version"]: v
        for v in (await call(client, services, operator, COMPARE))["data"]["modelComparison"][
            "versions"
        ]
    }
    assert (versions[packaged]["role"], versions[packaged]["requests"]) == ("LIVE", 2)
    agreement = versions["strict"]["shadowAgreement"]
    assert (agreement["liveVersion"], agreement["compared"], agreement["failed"]) == (
        packaged,
        2,
        0,
    )
    assert {m["name"]: m["mean"] for m in agreement["metrics"]} == {
        "decision_agreement": 0.0,
        "live_flagged": 0.0,
        "shadow_flagged": 1.0,
    }

    promoted = await call(
        client,
        services,
        operator,
        'mutation { promoteModelVersion(model: "attack-head", version: "strict") { live } }',
    )
    assert promoted["data"]["promoteModelVersion"]["live"] == "strict", promoted
    blocked = (await call(client, services, operator, CHECK, text=ORDINARY))["data"]
    assert blocked["guardrailCheck"]["blocked"]
    [decision] = blocked["guardrailCheck"]["decisions"]
    assert decision["reason"] == "learned score 1.00 (attack-head@strict)"
