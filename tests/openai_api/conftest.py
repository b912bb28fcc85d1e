"""Fixtures shared with the run tests (committed accounts, the LLM stub)."""

from tests.agents.test_runs import account, chat_settings, llm  # noqa: F401
