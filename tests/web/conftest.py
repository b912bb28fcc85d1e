"""Committed accounts and the LLM stub for the browser tests; Playwright's waits scaled."""

from playwright.async_api import expect

from tests.agents.test_runs import account, chat_settings, llm  # noqa: F401
from tests.conftest import scaled

# An `expect` without its own timeout waits 5 s: too short on a busy machine (CI once saw the
# Send button stay disabled past it after a 35 s answer, while the run's last event arrived).
expect.set_options(timeout=scaled(20) * 1000)
