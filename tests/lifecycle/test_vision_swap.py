"""A vision model's versions through the whole loop, on a live server (its own connection pool,
its inference pool of real workers): an operator registers a model over GraphQL, the server
loads and warms it and reports it ready; version 2 loads beside it, promoting it sends the next
job to it (recorded on the job); retiring version 1 drains it and unloads it from every worker."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.auth.passwords import hash_password
from backend.config import Settings, VisionSettings
from backend.core.db import Database
from backend.core.models import Tenant, User, UserRole
from backend.inference.manifest import builtin_manifests
from backend.services import Services
from backend.vision.service import VisionTask
from tests.accounts import PASSWORD
from tests.agents.test_runs import gql
from tests.conftest import VISION_TIMEOUTS, LiveServer, scaled, serve_live
from tests.lifecycle.test_graphql import MODEL, REGISTER, SET_POLICY
from tests.vision.test_graphql import text_image
from tests.vision.test_recovery import photo

EMAIL = "ops@operators.example"


def toy(model: str, version: str, top: int) -> dict[str, Any]:
    """A classifier manifest (tests/inference/toys.py) whose versions answer different classes."""
    return {
        "name": model,
        "version": version,
        "task": "classification",
        "runtime": "python",
        "loader": "tests.inference.toys:top_class",
        "input": {"size": 16, "top": top},
        "labels": ["one", "two"],
    }


@pytest.fixture
async def operators(settings: Settings, engine: AsyncEngine) -> AsyncIterator[str]:
    """A committed operator tenant and its owner (the live server cannot see rolled-back rows);
    the registry model the test makes is deleted afterwards (the registry is platform-wide)."""
    db = Database.connect(engine.url.render_as_string(hide_password=False), settings.database)
    slug = f"ops-{secrets.token_hex(4)}"
    try:
        async with db.session() as session:
            tenant = Tenant(slug=slug, name="Operators")
            session.add(tenant)
        async with db.session(tenant.id) as session:
            session.add(
                User(
                    tenant_id=tenant.id,
                    email=EMAIL,
                    role=UserRole.OWNER,
                    password_hash=await hash_password(PASSWORD),
                )
            )
        yield slug
    finally:
        async with db.session() as session:
            await session.execute(text("DELETE FROM registry_models WHERE name LIKE 'swap-%'"))
        await db.dispose()


async def token_of(server: LiveServer, tenant: str, email: str = EMAIL) -> str:
    import httpx

    async with httpx.AsyncClient(base_url=server.http_url) as http:
        response = await http.post(
            "/oauth/token",
            data={
                "grant_type": "password",
                "tenant": tenant,
                "username": email,
                "password": PASSWORD,
            },
        )
    return str(response.json()["access_token"])


async def until_ready(server: LiveServer, token: str, model: str, version: str) -> None:
    query = f'query {{ model(name: "{model}") {{ versions {{ version status }} }} }}'
    async with asyncio.timeout(scaled(120)):  # loaded, warmed and reported by the replica
        while True:
            body = await gql(server, token, query)
            versions = {v["version"]: v["status"] for v in body["data"]["model"]["versions"]}
            if versions[version] in ("READY", "LIVE"):
                return
            assert versions[version] != "FAILED", body
            await asyncio.sleep(0.2)


async def job_result(
    services: Services,
    tenant: str,
    task: VisionTask,
    image: bytes,
    email: str = EMAIL,
    **options: Any,
) -> dict[str, Any]:
    """The stored result of one `task` of a job of `email` on `image`, once the job ended."""
    assert services.vision is not None
    principal = await services.auth.principal_for(tenant, email)
    job = await services.vision.analyze(principal, image, [task], **options)
    events = await services.vision.job_events(principal, job.id, None)
    async with asyncio.timeout(scaled(60)), aclosing(events):  # type: ignore[type-var]
        async for event in events:
            if event.terminal:
                break
    return dict((await services.vision.job(principal, job.id)).results[task.value])


async def served(
    services: Services, tenant: str, model: str, email: str = EMAIL, image: bytes | None = None
) -> tuple[str, str]:
    """The version that served a classification job of `email` (of `image`, else a photo), and
    its top class."""
    result = await job_result(
        services, tenant, VisionTask.CLASSIFY, image or photo(), email, classifier=model
    )
    assert result["model"] == model, result
    return str(result["version"]), str(result["result"]["classes"][0]["label"])


async def test_a_new_version_loads_takes_the_traffic_and_the_old_one_unloads(
    settings: Settings, operators: str
) -> None:
    settings.privacy = settings.privacy.model_copy(update={"operator_tenant": operators})
    settings.vision = VisionSettings(enabled=True, **VISION_TIMEOUTS)
    model = f"swap-{secrets.token_hex(3)}"
    async with serve_live(settings) as server:
        token = await token_of(server, operators)
        pool = server.services.inference
        assert pool is not None

        first = await gql(
            server,
            token,
            REGISTER,
            model=model,
            version="1",
            spec=toy(model, "1", 0),
            kind="VISION",
        )
        assert (first.get("data") or {}).get("registerModelVersion"), first
        assert first["data"]["registerModelVersion"]["status"] == "LOADING", first
        await until_ready(server, token, model, "1")
        live = await gql(
            server,
            token,
            "mutation($m: String!) { setTrafficPolicy(model: $m, "
            'arms: [{version: "1", weight: 100}]) { live } }',
            m=model,
        )
        assert live["data"]["setTrafficPolicy"]["live"] == "1", live
        assert (await served(server.services, operators, model)) == ("1", "one")

        second = await gql(
            server, token, REGISTER, model=model, version="2", spec=toy(model, "2", 1)
        )
        assert second["data"]["registerModelVersion"]["status"] == "LOADING", second
        await until_ready(server, token, model, "2")
        promoted = await gql(
            server,
            token,
            f'mutation {{ promoteModelVersion(model: "{model}", version: "2") {{ live }} }}',
        )
        assert promoted["data"]["promoteModelVersion"]["live"] == "2", promoted
        async with asyncio.timeout(scaled(30)):  # the replica takes the policy in
            while (await served(server.services, operators, model))[0] != "2":
                await asyncio.sleep(0.1)
        assert (await served(server.services, operators, model)) == ("2", "two")

        retired = await gql(
            server,
            token,
            f'mutation {{ retireModelVersion(model: "{model}", version: "1") {{ status }} }}',
        )
        assert retired["data"]["retireModelVersion"]["status"] == "RETIRED", retired
        async with asyncio.timeout(scaled(60)):  # drained, then unloaded by every worker
            while any(f"{model}@1" in held for held in await pool.worker_models()):
                await asyncio.sleep(0.2)
        assert all(f"{model}@2" in held for held in await pool.worker_models())
        assert (await served(server.services, operators, model)) == ("2", "two")


# -- Tesseract and RapidOCR: two engines, one OCR model ----------------------------------------

COMPARISON = """query($m: String!) { modelComparison(model: $m, window: 600) { versions {
  version role shadowAgreement { compared failed metrics { name mean } } } } }"""


async def shadow_agreement(server: LiveServer, token: str, model: str) -> dict[str, Any] | None:
    """How `model`'s shadow compared with live (`modelComparison`), once it has compared one."""
    body = await gql(server, token, COMPARISON, m=model)
    assert "errors" not in body, body
    for figures in body["data"]["modelComparison"]["versions"]:
        if figures["role"] == "SHADOW" and figures["shadowAgreement"]["compared"]:
            return figures["shadowAgreement"]  # type: ignore[no-any-return]
    return None


async def test_rapidocr_is_a_canary_of_tesseract_compared_by_cer_then_promoted_and_rolled_back(
    settings: Settings, operators: str
) -> None:
    """Tesseract, which each server runs itself, is the registry's `tesseract` model (seeded
    live at its own version); RapidOCR registered as a version of it loads in the inference
    pool, runs as a shadow compared by character error rate (never returned), then takes the
    OCR traffic when promoted, and gives it back on rollback. A version on Tesseract's own
    runtime cannot be registered (each server has its own)."""
    settings.privacy = settings.privacy.model_copy(update={"operator_tenant": operators})
    settings.vision = VisionSettings(enabled=True, **VISION_TIMEOUTS)
    rapidocr = {m.name: m for m in builtin_manifests()}["rapidocr"].to_dict()
    del rapidocr["name"], rapidocr["version"]
    image = text_image()
    async with serve_live(settings) as server:
        token = await token_of(server, operators)
        described = await gql(server, token, MODEL, name="tesseract")
        seeded = described["data"]["model"]
        assert (seeded["kind"], seeded["task"]) == ("VISION", "ocr"), described
        [(own, status)] = [(v["version"], v["status"]) for v in seeded["versions"]]
        assert (status, seeded["policy"]["live"]) == ("LIVE", own), described

        async def read(**options: Any) -> tuple[str, str]:
            result = await job_result(server.services, operators, VisionTask.OCR, image, **options)
            assert result["model"] == "tesseract", result
            return str(result["version"]), str(result["result"]["text"])

        version, text = await read()
        assert version == own
        assert "Invoice 4711" in text

        refused = await gql(
            server,
            token,
            REGISTER,
            model="tesseract",
            version="psm6",
            spec={"task": "ocr", "runtime": "tesseract", "input": {"psm": 6}},
        )
        assert refused["errors"][0]["extensions"]["code"] == "INVALID_MODEL_SPEC", refused

        registered = await gql(
            server, token, REGISTER, model="tesseract", version="rapidocr-3.10.0", spec=rapidocr
        )
        assert registered["data"]["registerModelVersion"]["status"] == "LOADING", registered
        await until_ready(server, token, "tesseract", "rapidocr-3.10.0")
        shadowed = await gql(
            server,
            token,
            SET_POLICY,
            model="tesseract",
            arms=[{"version": own, "weight": 100}],
            shadow="rapidocr-3.10.0",
            rate=1.0,
        )
        assert shadowed["data"]["setTrafficPolicy"]["shadow"] == "rapidocr-3.10.0", shadowed

        async with asyncio.timeout(scaled(90)):
            while (found := await shadow_agreement(server, token, "tesseract")) is None:
                assert (await read())[0] == own  # the shadow's text never reaches the caller
                await asyncio.sleep(0.2)
        assert found["failed"] == 0, found
        [rate] = found["metrics"]
        assert rate["name"] == "cer", found
        assert 0.0 <= rate["mean"] < 0.5, found

        promoted = await gql(
            server,
            token,
            'mutation { promoteModelVersion(model: "tesseract", version: "rapidocr-3.10.0") '
            "{ live } }",
        )
        assert promoted["data"]["promoteModelVersion"]["live"] == "rapidocr-3.10.0", promoted
        version, text = await read()
        assert version == "rapidocr-3.10.0"
        assert "Invoice 4711" in text
        assert (await read(ocr_engine=f"tesseract@{own}"))[0] == own  # a request's pin wins

        rolled = await gql(server, token, 'mutation { rollbackModel(model: "tesseract") { live } }')
        assert rolled["data"]["rollbackModel"]["live"] == own, rolled
        assert (await read())[0] == own
