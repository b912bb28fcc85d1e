"""Committed accounts and a stub LLM for the live-server tests (tests/core/test_traces.py)."""

from tests.agents.test_runs import account, chat_settings, llm  # noqa: F401
