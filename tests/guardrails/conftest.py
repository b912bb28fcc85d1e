"""The chat fixtures (LLM stub, chat settings) for the rails' end-to-end tests."""

from tests.agents.test_runs import chat_settings, llm  # noqa: F401
