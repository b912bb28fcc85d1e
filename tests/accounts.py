"""A tenant with an owner and a member, signed in through the real token endpoint."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from fastapi import FastAPI
from httpx import AsyncClient
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.auth.passwords import hash_password
from backend.config import Settings
from backend.core.db import Database
from backend.core.models import Tenant, User, UserRole
from backend.services import Services

PASSWORD = "correct horse battery staple"


@dataclass
class Account:
    tenant: Tenant
    email: str
    user_id: uuid.UUID
    access_token: str
    refresh_token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.access_token}"}


async def committed_tenant(
    settings: Settings,
    engine: AsyncEngine,
    name: str,
    users: Sequence[tuple[str, UserRole]],
    password: str = PASSWORD,
) -> Tenant:
    """A tenant (slug `name-<random>`) with `users` (email, role), committed: live servers
    cannot see a test's rolled-back rows."""
    db = Database.connect(engine.url.render_as_string(hide_password=False), settings.database)
    try:
        async with db.session() as session:
            tenant = Tenant(slug=f"{name.lower()}-{secrets.token_hex(4)}", name=name)
            session.add(tenant)
        async with db.session(tenant.id) as session:
            for email, role in users:
                session.add(
                    User(
                        tenant_id=tenant.id,
                        email=email,
                        role=role,
                        password_hash=await hash_password(password),
                    )
                )
    finally:
        await db.dispose()
    return tenant


async def token(client: AsyncClient, **form: str) -> dict:
    response = await client.post("/oauth/token", data=form)
    return {"status": response.status_code, **response.json()}


async def sign_in(client: AsyncClient, tenant: Tenant, email: str) -> Account:
    body = await token(
        client, grant_type="password", tenant=tenant.slug, username=email, password=PASSWORD
    )
    assert body["status"] == 200, body
    me = await client.post(
        "/graphql",
        json={"query": "{ me { userId } }"},
        headers={"authorization": f"Bearer {body['access_token']}"},
    )
    return Account(
        tenant,
        email,
        uuid.UUID(me.json()["data"]["me"]["userId"]),
        body["access_token"],
        body["refresh_token"],
    )


@pytest.fixture
def services(app: FastAPI) -> Services:
    return app.state.services


async def make_tenant(services: Services, *roles: UserRole) -> tuple[Tenant, list[str]]:
    tenant = await services.auth.ensure_tenant(f"t-{uuid.uuid4().hex[:10]}", "Test tenant")
    emails = []
    for i, role in enumerate(roles):
        email = f"{role.value}{i}@{tenant.slug}.example"
        await services.auth.create_user(
            tenant_id=tenant.id, email=email, password=PASSWORD, role=role
        )
        emails.append(email)
    return tenant, emails


@pytest.fixture
async def owner(client: AsyncClient, services: Services) -> Account:
    tenant, (email,) = await make_tenant(services, UserRole.OWNER)
    return await sign_in(client, tenant, email)


@pytest.fixture
async def member(client: AsyncClient, services: Services, owner: Account) -> Account:
    email = f"member@{owner.tenant.slug}.example"
    await services.auth.create_user(
        tenant_id=owner.tenant.id, email=email, password=PASSWORD, role=UserRole.MEMBER
    )
    return await sign_in(client, owner.tenant, email)


@pytest.fixture
async def stranger(client: AsyncClient, services: Services) -> Account:
    """The owner of another tenant."""
    tenant, (email,) = await make_tenant(services, UserRole.OWNER)
    return await sign_in(client, tenant, email)
