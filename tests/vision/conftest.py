"""Committed accounts for the live-server tests."""

from tests.agents.test_runs import account, chat_settings, llm  # noqa: F401
