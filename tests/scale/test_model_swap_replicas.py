"""A vision model's hot-swap across two replicas on the embedded default (each its own local
inference pool), under load: clients classify through both replicas during the whole swap. A
version registered on one replica loads in the pools of both before it is READY; a promotion
sent to one replica moves the traffic of both; retiring the old version drains and unloads it
on both. No request fails, and every result names the version that served it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from tests.conftest import REDIS_URL, scaled
from tests.faults.conftest import gql, sign_in, until
from tests.faults.servers import (
    PATIENCE_S,
    AppServer,
    PrivatePostgres,
    Stubs,
    server_environment,
    serving,
)
from tests.lifecycle.test_graphql import REGISTER
from tests.lifecycle.test_vision_swap import toy
from tests.vision.test_recovery import photo

pytestmark = [pytest.mark.scale, pytest.mark.timeout(900)]

ANALYZE = """mutation($image: Upload!, $c: String!) {
  analyzeImage(image: $image, tasks: [CLASSIFY], classifier: $c) { id } }"""
JOB = "query($id: ID!) { visionJob(id: $id) { status results errorCode } }"
VERSIONS = "query($m: String!) { model(name: $m) { versions { version status } } }"
LOADED = "{ visionModels { name version status } }"


@pytest.fixture
async def local_replicas(
    tmp_path: Path,
    postgres: PrivatePostgres,
    stubs: tuple[Stubs, str],
    key_prefix: str,
    redis: Redis,  # the shared Redis: this test's keys are deleted afterwards
    account: dict[str, Any],
) -> AsyncIterator[tuple[AppServer, AppServer]]:
    """Replicas A and B with vision on their own inference pools (the embedded default), the
    account's tenant the platform's operators, no limits (the clients send jobs back to back)."""
    _, url = stubs
    environment = server_environment(
        database_url=postgres.url,
        redis_url=REDIS_URL,
        stubs_url=url,
        redis_key_prefix=key_prefix,
        vision_enabled="true",
        vision_workers=1,
        vision_threads=1,
        vision_infer_timeout_s=scaled(120),
        vision_job_lease_s=2,
        vision_job_lost_grace_s=5,
        models_reconcile_s=2,
        privacy_operator_tenant=account["tenant"],
        limits_enabled="false",
    )
    a = AppServer(tmp_path / "replica-a", environment)
    b = AppServer(tmp_path / "replica-b", environment)
    async with serving(a, b):
        yield a, b


@dataclass
class Client:
    """Classifies through one replica, job after job, until stopped: what each job answered."""

    server: AppServer
    token: str
    model: str
    served: list[str] = field(default_factory=list)  # the version of each completed job
    failures: list[Any] = field(default_factory=list)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        image = photo()
        async with httpx.AsyncClient(base_url=self.server.http_url, timeout=PATIENCE_S) as http:
            while not self.stopped.is_set():
                job = await self._submit(http, image)
                if job is not None:
                    await self._wait(job)

    async def _submit(self, http: httpx.AsyncClient, image: bytes) -> str | None:
        operations = {"query": ANALYZE, "variables": {"image": None, "c": self.model}}
        response = await http.post(
            "/graphql",
            data={
                "operations": json.dumps(operations),
                "map": json.dumps({"0": ["variables.image"]}),
            },
            files={"0": ("cat.jpg", image, "image/jpeg")},
            headers={"authorization": f"Bearer {self.token}"},
        )
        body = response.json()
        if "errors" in body:
            self.failures.append(body["errors"])
            return None
        return str(body["data"]["analyzeImage"]["id"])

    async def _wait(self, job: str) -> None:
        async with asyncio.timeout(scaled(120)):
            while True:
                body = await gql(self.server.http_url, self.token, JOB, id=job)
                found = body["data"]["visionJob"] if "errors" not in body else None
                if found is None:
                    self.failures.append(body)
                    return
                if found["status"] == "COMPLETED":
                    result = found["results"]["classify"]
                    if result["model"] != self.model or "result" not in result:
                        self.failures.append(found)
                    else:
                        self.served.append(str(result["version"]))
                    return
                if found["status"] == "FAILED":
                    self.failures.append(found)
                    return
                await asyncio.sleep(0.05)


async def _status(server: AppServer, token: str, model: str) -> dict[str, str]:
    body = await gql(server.http_url, token, VERSIONS, m=model)
    assert "errors" not in body, body
    return {v["version"]: v["status"] for v in body["data"]["model"]["versions"]}


async def _loaded(server: AppServer, token: str, model: str) -> dict[str, str]:
    """The versions of `model` in the replica's own pool, with their status there."""
    body = await gql(server.http_url, token, LOADED)
    assert "errors" not in body, body
    return {m["version"]: m["status"] for m in body["data"]["visionModels"] if m["name"] == model}


async def _ready_on_both(
    replicas: tuple[AppServer, AppServer], tokens: list[str], model: str, version: str
) -> None:
    async def ready() -> bool:
        status = (await _status(replicas[0], tokens[0], model)).get(version)
        assert status != "FAILED", await _status(replicas[0], tokens[0], model)
        return status in ("READY", "LIVE")

    await until(ready, f"{model}@{version} READY", timeout_s=scaled(180))
    # READY means loaded by every replica
    for server, token in zip(replicas, tokens, strict=True):
        assert (await _loaded(server, token, model)).get(version) == "ready"


async def test_a_version_swaps_on_both_replicas_under_load_with_no_failed_request(
    local_replicas: tuple[AppServer, AppServer], account: dict[str, Any]
) -> None:
    a, b = local_replicas
    tokens = [await sign_in(a.http_url, account), await sign_in(b.http_url, account)]
    model = f"swap-{secrets.token_hex(3)}"

    registered = await gql(
        a.http_url,
        tokens[0],
        REGISTER,
        model=model,
        version="1",
        spec=toy(model, "1", 0),
        kind="VISION",
    )
    assert "errors" not in registered, registered
    await _ready_on_both(local_replicas, tokens, model, "1")
    policy = await gql(
        b.http_url,
        tokens[1],
        'mutation($m: String!) { setTrafficPolicy(model: $m, arms: [{version: "1", '
        "weight: 100}]) { live } }",
        m=model,
    )
    assert policy["data"]["setTrafficPolicy"]["live"] == "1", policy

    clients = [
        Client(server, token, model) for server, token in zip(local_replicas, tokens, strict=True)
    ]
    clients += [
        Client(server, token, model) for server, token in zip(local_replicas, tokens, strict=True)
    ]
    running = [asyncio.create_task(c.run()) for c in clients]
    try:
        await until(lambda: all(c.served for c in clients), "every client served by v1")

        # version 2 registered through B loads in both pools while the clients run on v1
        second = await gql(
            b.http_url, tokens[1], REGISTER, model=model, version="2", spec=toy(model, "2", 1)
        )
        assert second["data"]["registerModelVersion"]["status"] == "LOADING", second
        await _ready_on_both(local_replicas, tokens, model, "2")
        assert {v for c in clients for v in c.served} == {"1"}  # READY, not yet served

        promoted = await gql(
            a.http_url,
            tokens[0],
            f'mutation {{ promoteModelVersion(model: "{model}", version: "2") {{ live }} }}',
        )
        assert promoted["data"]["promoteModelVersion"]["live"] == "2", promoted
        marks = [len(c.served) for c in clients]

        async def both_moved() -> bool:  # a job each, on both replicas, served by v2
            return all(c.served[m:].count("2") >= 1 for c, m in zip(clients, marks, strict=True))

        await until(both_moved, "both replicas serve v2", timeout_s=scaled(60))
        moved = [len(c.served) for c in clients]

        retired = await gql(
            b.http_url,
            tokens[1],
            f'mutation {{ retireModelVersion(model: "{model}", version: "1") {{ status }} }}',
        )
        assert retired["data"]["retireModelVersion"]["status"] == "RETIRED", retired

        async def unloaded() -> bool:  # drained, then unloaded from both pools
            held = [await _loaded(s, t, model) for s, t in zip(local_replicas, tokens, strict=True)]
            return all("1" not in versions for versions in held)

        await until(unloaded, "v1 unloaded on both replicas", timeout_s=scaled(120))
        done = [len(c.served) for c in clients]
        await until(
            lambda: all(len(c.served) > n for c, n in zip(clients, done, strict=True)),
            "every client served after the retirement",
        )
    finally:
        for client in clients:
            client.stopped.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(scaled(120)):
                await asyncio.gather(*running, return_exceptions=True)
        for task in running:
            task.cancel()
    for client, at in zip(clients, moved, strict=True):
        assert client.failures == []
        assert set(client.served) <= {"1", "2"}
        assert set(client.served[at:]) == {"2"}  # once moved, never back
    for server, token in zip(local_replicas, tokens, strict=True):
        assert (await _loaded(server, token, model)) == {"2": "ready"}
