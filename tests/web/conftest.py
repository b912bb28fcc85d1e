"""Committed accounts and the LLM stub for the browser tests."""

from tests.agents.test_runs import account, chat_settings, llm  # noqa: F401
