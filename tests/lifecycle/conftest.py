"""A ModelRegistryService on the test's transaction and Redis prefix, and the principals that
use it: a platform operator (owner of the operator tenant), a tenant admin and a member of
another tenant; the per-version figures on the real Redis, under the test's key prefix."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from backend.app import build_signer
from backend.auth.principal import Principal
from backend.auth.service import AuthService
from backend.config import LifecycleSettings, Settings
from backend.core.db import Database
from backend.core.models import UserRole
from backend.core.redis import KeySpace
from backend.lifecycle._series import Series
from backend.lifecycle.policy import ModelKind
from backend.lifecycle.service import ModelRegistryService
from backend.lifecycle.shadow import ShadowLedger
from backend.lifecycle.stats import ServingStats
from tests.accounts import PASSWORD


@dataclass
class People:
    operator: Principal
    admin: Principal  # of another tenant
    member: Principal  # of the admin's tenant
    operators_slug: str


@pytest.fixture
def lifecycle_settings() -> LifecycleSettings:
    return LifecycleSettings()


@pytest.fixture
def auth(db: Database, redis: Redis, key_prefix: str, settings: Settings) -> AuthService:
    return AuthService(db, build_signer(settings), redis, KeySpace(key_prefix), settings.auth)


@pytest.fixture
async def people(auth: AuthService) -> People:
    slug = f"ops-{uuid.uuid4().hex[:8]}"
    found = []
    for tenant_slug, role in ((slug, UserRole.OWNER), (f"t-{uuid.uuid4().hex[:8]}", None)):
        tenant = await auth.ensure_tenant(tenant_slug, "Registry test")
        roles = [role] if role else [UserRole.ADMIN, UserRole.MEMBER]
        for i, each in enumerate(roles):
            email = f"{each.value}{i}@{tenant_slug}.example"
            await auth.create_user(tenant_id=tenant.id, email=email, password=PASSWORD, role=each)
            found.append(await auth.principal_for(tenant_slug, email))
    operator, admin, member = found
    return People(operator, admin, member, slug)


@pytest.fixture
def registry(
    db: Database,
    redis: Redis,
    key_prefix: str,
    auth: AuthService,
    people: People,
    lifecycle_settings: LifecycleSettings,
) -> ModelRegistryService:
    return ModelRegistryService(
        db=db,
        redis=redis,
        keys=KeySpace(key_prefix),
        settings=lifecycle_settings,
        auth=auth,
        operator_tenant=people.operators_slug,
    )


def chat_spec(url: str = "http://llm.example/v1") -> dict[str, Any]:
    return {"provider": "openai", "base_url": url}


async def chat_model(
    registry: ModelRegistryService, name: str, *versions: str, principal: Principal | None = None
) -> None:
    """A chat model with ready versions (nothing to load)."""
    for version in versions:
        await registry.register_version(
            principal,
            name,
            version,
            kind=ModelKind.CHAT,
            spec=chat_spec(f"http://llm-{version}.example/v1"),
        )


def weights_file(folder: Path, content: bytes = b"weights") -> tuple[Path, str]:
    path = folder / f"w-{uuid.uuid4().hex[:6]}.onnx"
    path.write_bytes(content)
    return path, hashlib.sha256(content).hexdigest()


def vision_spec(weights: Path, sha256: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"task": "classification", "runtime": "onnx", "weights": str(weights)}
    if sha256 is not None:
        spec["sha256"] = sha256
    return spec


async def audit(connection: AsyncConnection, event: str) -> list[dict[str, Any]]:
    """Audit rows of `event` written in the test's transaction, as the database owner (past
    row-level security: rows of no tenant are the CLI's and the server's). Rows that live
    servers of earlier tests committed are older than the transaction (`now()` is its start)."""
    await connection.execute(text("RESET ROLE"))
    rows = await connection.execute(
        text(
            "SELECT tenant_id, actor_id, outcome, details FROM audit_events "
            "WHERE event = :e AND created_at >= now() ORDER BY id"
        ),
        {"e": event},
    )
    return [dict(r._mapping) for r in rows]


@pytest.fixture
async def series(
    redis: Redis, key_prefix: str, lifecycle_settings: LifecycleSettings
) -> AsyncIterator[Series]:
    kept = Series(redis, KeySpace(key_prefix), lifecycle_settings)
    yield kept
    await kept.close()


@pytest.fixture
def stats(series: Series) -> ServingStats:
    return ServingStats(series)


@pytest.fixture
def ledger(series: Series) -> ShadowLedger:
    return ShadowLedger(series)
