"""Vision jobs belong to the user who started them: read, described, streamed and attached by
that user alone (a tenant admin included). Stored jobs, no inference pool needed."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi import FastAPI
from httpx import AsyncClient

from backend.auth.principal import Principal
from backend.core.models import VisionJob, VisionStatus
from backend.errors import NotFound
from backend.services import Services
from tests.accounts import Account

JOB = "query($id: ID!) { visionJob(id: $id) { id sha256 results } }"


async def stored_job(app: FastAPI, account: Account) -> uuid.UUID:
    """A completed job of `account`, as the service would have stored it."""
    async with app.state.sightline.db.session(account.tenant.id) as session:
        job = VisionJob(
            tenant_id=account.tenant.id,
            created_by=account.user_id,
            status=VisionStatus.COMPLETED.value,
            tasks=["ocr"],
            media_type="image/png",
            width=10,
            height=10,
            size_bytes=100,
            sha256="ab" * 32,
            results={"ocr": {"result": {"text": "the secret on the page"}}},
        )
        session.add(job)
        await session.flush()
        return job.id


async def gql(client: AsyncClient, account: Account, query: str, **variables: Any) -> dict:
    response = await client.post(
        "/graphql", json={"query": query, "variables": variables}, headers=account.headers
    )
    return response.json()


async def principal_of(services: Services, account: Account) -> Principal:
    return await services.auth.authenticate(account.access_token)


async def test_only_the_creator_reads_a_vision_job(
    app: FastAPI, client: AsyncClient, owner: Account, member: Account
) -> None:
    job = await stored_job(app, owner)
    mine = await gql(client, owner, JOB, id=str(job))
    assert mine["data"]["visionJob"]["sha256"] == "ab" * 32
    theirs = await gql(client, member, JOB, id=str(job))
    assert theirs["data"] is None
    assert theirs["errors"][0]["extensions"]["code"] == "NOT_FOUND"

    # the tenant's owner (an admin) does not read a member's job either: "the caller's"
    members_job = await stored_job(app, member)
    by_admin = await gql(client, owner, JOB, id=str(members_job))
    assert by_admin["errors"][0]["extensions"]["code"] == "NOT_FOUND"


async def test_another_users_job_is_neither_streamed_nor_described(
    app: FastAPI, services: Services, owner: Account, member: Account
) -> None:
    job = await stored_job(app, owner)
    assert services.vision is not None
    intruder = await principal_of(services, member)
    with pytest.raises(NotFound):
        await services.vision.job_events(intruder, job, None)
    with pytest.raises(NotFound):
        await services.vision.describe(intruder, job)
    creator = await principal_of(services, owner)
    assert (await services.vision.describe(creator, job))["text"] == "the secret on the page"


async def test_another_users_job_cannot_be_attached_to_a_message(
    app: FastAPI, client: AsyncClient, owner: Account, member: Account
) -> None:
    job = await stored_job(app, owner)
    created = await gql(client, member, 'mutation { createConversation(title: "x") { id } }')
    conversation = created["data"]["createConversation"]["id"]
    sent = await gql(
        client,
        member,
        'mutation($c: ID!, $a: [ID!]) { sendMessage(conversationId: $c, content: "look", '
        "attachments: $a) { run { id } } }",
        c=conversation,
        a=[str(job)],
    )
    assert sent["data"] is None
    assert sent["errors"][0]["extensions"]["code"] == "NOT_FOUND"
