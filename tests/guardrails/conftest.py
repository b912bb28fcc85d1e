"""The rails' fixtures: the service on each engine with a tenant's admin, and for the end-to-end
tests the LLM stub and chat settings on each guardrails engine (every test runs on both)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import pytest

from backend.auth.principal import CredentialKind, Principal
from backend.auth.scopes import ALL_SCOPES
from backend.config import (
    ChatSettings,
    ClassifierMode,
    GuardrailEngine,
    GuardrailSettings,
    Settings,
)
from backend.core.db import Database
from backend.core.models import Tenant, User, UserRole
from backend.guardrails.nemo import NemoGuardrailService
from backend.guardrails.service import GuardrailService
from tests.agents.test_runs import llm  # noqa: F401 (the LLM stub fixture)
from tests.conftest import GUARDRAIL_TIMEOUT_S
from tests.llm_stub import LLMStub


@pytest.fixture(params=[GuardrailEngine.LOCAL, GuardrailEngine.NEMO], ids=["local", "nemo"])
def chat_settings(
    request: pytest.FixtureRequest,
    settings: Settings,
    llm: tuple[LLMStub, str],  # noqa: F811
) -> Settings:
    settings.chat = ChatSettings(
        llm_base_url=llm[1], llm_model="echo", run_lease_s=1, llm_retries=1
    )
    settings.guardrails = GuardrailSettings(
        engine=request.param,
        check_timeout_s=GUARDRAIL_TIMEOUT_S,
        classifier=ClassifierMode.OFF,  # its worker is tested in test_classifier.py
    )
    return settings


async def principal_of(db: Database) -> Principal:
    async with db.session() as session:
        tenant = Tenant(slug=f"rails-{secrets.token_hex(4)}", name="Rails")
        session.add(tenant)
    async with db.session(tenant.id) as session:
        user = User(tenant_id=tenant.id, email="admin@rails.example", role=UserRole.ADMIN)
        session.add(user)
    return Principal(
        user_id=user.id,
        tenant_id=tenant.id,
        role=UserRole.ADMIN,
        scopes=ALL_SCOPES,
        credential=CredentialKind.ACCESS_TOKEN,
    )


Make = Callable[..., GuardrailService]


@pytest.fixture(params=["local", "nemo"])
def make(request: pytest.FixtureRequest, db: Database) -> Make:
    """Builds the rails on either engine: every test here runs on both."""

    def build(**options: Any) -> GuardrailService:
        options.setdefault("check_timeout_s", GUARDRAIL_TIMEOUT_S)
        if request.param == "nemo":
            return NemoGuardrailService(db, **options)
        return GuardrailService(db, **options)

    return build


@pytest.fixture
async def who(db: Database) -> Principal:
    return await principal_of(db)
