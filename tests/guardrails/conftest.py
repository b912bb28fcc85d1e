"""The chat fixtures for the rails' end-to-end tests: the LLM stub, and chat settings on each
guardrails engine (every end-to-end test runs on both)."""

from __future__ import annotations

import pytest

from backend.config import ChatSettings, GuardrailEngine, GuardrailSettings, Settings
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
        engine=request.param, check_timeout_s=GUARDRAIL_TIMEOUT_S
    )
    return settings
