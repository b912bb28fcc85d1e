"""The demo page as a user of a chat app expects it (Debian's chromium through Playwright, on a
live server with the LLM stub): conversation titles, the open one marked, rename and delete;
answers as Markdown with any HTML in them shown as text; images attached to a message;
documents searched and deleted, images ingested; a phone's first screen; the skip link; the
favicon."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Dialog, Page, async_playwright, expect
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.config import Settings
from backend.lifecycle.policy import RegistrySnapshot, VersionStatus
from tests.agents.test_model_versions import TEST_REVISIONS, record
from tests.agents.test_runs import gql, sign_in
from tests.conftest import LiveServer, serve_live
from tests.llm_stub import LLMStub
from tests.web.test_demo import CHROMIUM, page, server, signed_in, text_image  # noqa: F401

pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None, reason="Debian's chromium is not installed"
)


async def accept(dialog: Dialog) -> None:
    await dialog.accept()


async def dismiss(dialog: Dialog) -> None:
    await dialog.dismiss()


async def ask(tab: Page, question: str) -> None:
    """Sends `question` and waits for the whole answer."""
    await tab.get_by_role("textbox", name="Message").fill(question)
    await tab.get_by_role("button", name="Send").click()
    await expect(tab.get_by_role("button", name="Stop")).to_be_disabled(timeout=60_000)
    await expect(tab.get_by_role("button", name="Send")).to_be_enabled()


async def test_conversation_titles_highlight_rename_and_delete(
    page: Page,  # noqa: F811
    server: LiveServer,  # noqa: F811
    account: dict[str, Any],
) -> None:
    await signed_in(page, server, account)
    conversations = page.get_by_role("list", name="Conversations")
    await page.get_by_role("button", name="New conversation").click()
    await expect(conversations.get_by_role("button", name="Untitled", exact=True)).to_be_visible()

    await ask(page, "What is the **capital** of France?\nAnd why?")
    first = conversations.get_by_role("button", name="What is the capital of France?", exact=True)
    await expect(first).to_have_attribute("aria-current", "true")  # titled after its answer

    await page.get_by_role("button", name="New conversation").click()
    await ask(page, "Second question")  # sent at once: it goes to the new conversation
    second = conversations.get_by_role("button", name="Second question", exact=True)
    await expect(second).to_have_attribute("aria-current", "true")
    await expect(first).not_to_have_attribute("aria-current", "true")
    await expect(conversations.locator("li.current")).to_have_count(1)

    await first.click()
    await expect(first).to_have_attribute("aria-current", "true")
    await expect(page.locator(".message.user").first).to_contain_text("of France?")

    await conversations.get_by_role("button", name="Rename What is the capital of France?").click()
    title = page.get_by_role("textbox", name="New title")
    await expect(title).to_be_focused()
    await title.fill("Geography")
    await title.press("Enter")
    renamed = conversations.get_by_role("button", name="Geography", exact=True)
    await expect(renamed).to_have_attribute("aria-current", "true")
    await expect(renamed).to_be_focused()
    await page.reload()
    await expect(renamed).to_be_visible()

    page.once("dialog", dismiss)  # "Delete …?" answered no: nothing happens
    await conversations.get_by_role("button", name="Delete Geography").click()
    await expect(renamed).to_be_visible()
    page.once("dialog", accept)
    await conversations.get_by_role("button", name="Delete Geography").click()
    await expect(renamed).to_have_count(0)
    await expect(second).to_have_attribute("aria-current", "true")  # the next one opens
    token = await sign_in(server, account)
    listed = await gql(server, token, "{ conversations { edges { node { title } } } }")
    titles = [e["node"]["title"] for e in listed["data"]["conversations"]["edges"]]
    assert titles == ["Second question"]


MARKDOWN = """# Plan
Use **bold**, *italic* and `inline code`.

- first item
- second item

```python
print("<b>not bold</b>")
```

<script>window.pwned = 1</script>
<img src="x" onerror="window.pwned = 2">
See [the docs](https://example.com/docs) but not [this](javascript:window.pwned=3)."""


async def test_answers_are_markdown_and_html_in_them_is_text(
    page: Page,  # noqa: F811
    chat_settings: Settings,
    engine: AsyncEngine,
    account: dict[str, Any],
) -> None:
    chat_settings.chat.llm_model = "verbatim"  # the stub answers the message as written
    async with serve_live(chat_settings) as live:
        # the alias's version 2 (from the model registry) is live: the answer says so
        url = chat_settings.chat.llm_base_url
        live_version = record("2", url or "", VersionStatus.LIVE, model="verbatim")
        await live.services.runs.models.apply(  # newer than what the server's watcher holds
            RegistrySnapshot(versions={"default": (live_version,)}, revision=TEST_REVISIONS)
        )
        await signed_in(page, live, account)
        await page.get_by_role("button", name="New conversation").click()
        await ask(page, MARKDOWN)
        for shown_again in (False, True):  # as streamed, then from the history
            if shown_again:
                await page.reload()
            answer = page.locator(".message.assistant .text").last
            served = page.locator(".message.assistant .who .model").last
            await expect(served).to_have_text("default@2")
            await expect(served).to_have_attribute("title", "Model verbatim")
            await expect(answer.get_by_role("heading", name="Plan")).to_be_visible(timeout=30_000)
            await expect(answer.locator("strong")).to_have_text("bold")
            await expect(answer.locator("em")).to_have_text("italic")
            await expect(answer.locator(":not(pre) > code")).to_have_text("inline code")
            await expect(answer.locator("li")).to_have_text(["first item", "second item"])
            await expect(answer.locator("pre code")).to_have_text('print("<b>not bold</b>")')
            await expect(answer).to_contain_text("<script>window.pwned = 1</script>")
            await expect(answer).to_contain_text('<img src="x" onerror="window.pwned = 2">')
            link = answer.get_by_role("link", name="the docs")
            await expect(link).to_have_attribute("href", "https://example.com/docs")
            await expect(link).to_have_attribute("rel", "noopener noreferrer nofollow")
            await expect(answer.get_by_role("link")).to_have_count(1)  # not javascript:
            await expect(answer).to_contain_text("[this](javascript:window.pwned=3)")
            assert await page.locator(".log img, .log script, .log b").count() == 0
            assert await page.evaluate("window.pwned") is None
            user = page.locator(".message.user .text").last  # the question, as typed
            await expect(user).to_contain_text("**bold**")


async def test_an_image_attached_to_a_message(
    page: Page,  # noqa: F811
    server: LiveServer,  # noqa: F811
    account: dict[str, Any],
    llm: tuple[LLMStub, str],
    tmp_path: Path,
) -> None:
    stub, _ = llm
    await signed_in(page, server, account)
    await page.get_by_role("button", name="New conversation").click()
    picture = tmp_path / "invoice.png"
    picture.write_bytes(text_image())
    await page.get_by_label("Attach images", exact=True).set_input_files(str(picture))
    chips = page.get_by_role("list", name="Attached images")
    await expect(chips).to_contain_text("invoice.png")
    await page.get_by_role("textbox", name="Message").fill("What does the picture say?")
    await page.get_by_role("button", name="Send").click()  # waits for the analysis
    user = page.locator(".message.user").last
    await expect(user.get_by_role("img", name="Attached image")).to_be_visible(timeout=90_000)
    await expect(user).to_contain_text("What does the picture say?")
    await expect(chips.locator("li")).to_have_count(0)
    await expect(page.get_by_role("button", name="Send")).to_be_enabled(timeout=60_000)
    prompts = [r["messages"][0]["content"] for r in stub.requests]
    assert any("Invoice 4711" in p for p in prompts), prompts  # what the model was shown

    token = await sign_in(server, account)
    listed = await gql(
        server,
        token,
        "{ conversations { edges { node { messages { edges { node { role attachments } } } } } } }",
    )
    messages = listed["data"]["conversations"]["edges"][0]["node"]["messages"]["edges"]
    assert len(messages[0]["node"]["attachments"]) == 1
    await page.reload()  # the history shows the picture again (kept for this page's session)
    await expect(page.locator(".message.user").last.get_by_role("img")).to_be_visible()


async def test_documents_search_delete_and_image_documents(
    page: Page,  # noqa: F811
    server: LiveServer,  # noqa: F811
    account: dict[str, Any],
    tmp_path: Path,
) -> None:
    await signed_in(page, server, account)
    await page.get_by_role("link", name="Documents").click()
    upload = page.get_by_label("Document (Markdown, text, HTML, PDF, or an image of text)")
    accepted = (await upload.get_attribute("accept") or "").split(",")
    for kind in (".md", ".txt", ".html", ".pdf", ".png", ".jpg", ".jpeg", ".tiff", ".webp"):
        assert kind in accepted

    picture = tmp_path / "invoice.png"
    picture.write_bytes(text_image())
    await upload.set_input_files(str(picture))
    await page.get_by_role("button", name="Upload").click()
    await expect(page.get_by_role("status")).to_contain_text("Ingested", timeout=90_000)
    documents = page.get_by_role("list", name="Documents")
    await expect(documents).to_contain_text("invoice")

    handbook = tmp_path / "handbook.md"
    handbook.write_text("# Handbook\n\n## Refunds\n\nRefunds take fourteen days.\n")
    await upload.set_input_files(str(handbook))
    await page.get_by_role("button", name="Upload").click()
    await expect(documents).to_contain_text("Handbook", timeout=60_000)

    results = page.get_by_role("list", name="Search results")
    search = page.get_by_role("searchbox", name="Search the knowledge base")
    await search.fill("How long do refunds take?")
    await page.get_by_role("button", name="Search").click()
    await expect(results.locator("li").first).to_contain_text("Refunds take fourteen days.")
    await search.fill("invoice due Friday")
    await page.get_by_role("button", name="Search").click()
    await expect(results.locator("li").first).to_contain_text("Invoice 4711")

    page.once("dialog", accept)
    await documents.get_by_role("button", name="Delete Handbook").click()
    await expect(page.get_by_role("status")).to_have_text("Deleted Handbook.")
    await expect(documents).not_to_contain_text("Handbook")
    await search.fill("How long do refunds take?")
    await page.get_by_role("button", name="Search").click()
    await expect(results).not_to_contain_text("fourteen days")
    await expect(results.locator("li").first).to_contain_text("invoice")


@pytest.fixture
async def phone() -> AsyncIterator[Page]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield await browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
        finally:
            await browser.close()


async def test_a_phone_skip_link_and_favicon(
    phone: Page,
    server: LiveServer,  # noqa: F811
    account: dict[str, Any],
) -> None:
    token = await sign_in(server, account)
    for i in range(25):  # more than the mutation rate limit's burst: wait when refused
        for _ in range(50):
            created = await gql(
                server,
                token,
                "mutation($t: String!) { createConversation(title: $t) { id } }",
                t=f"Trip plans {i}",
            )
            if created.get("data"):
                break
            assert created["errors"][0]["extensions"]["code"] == "RATE_LIMITED", created
            await asyncio.sleep(0.25)
        assert created.get("data"), created
    await signed_in(phone, server, account)
    message = phone.get_by_role("textbox", name="Message")
    await expect(message).to_be_visible()
    box = await message.bounding_box()
    assert box is not None
    assert box["y"] + box["height"] <= 844  # on the first screen, without scrolling
    assert await phone.evaluate("window.scrollY") == 0
    toggle = phone.get_by_role("button", name="Conversations (25)")
    await expect(toggle).to_have_attribute("aria-expanded", "false")
    conversations = phone.get_by_role("list", name="Conversations")
    await expect(conversations).to_be_hidden()
    await toggle.click()
    await expect(conversations.locator("li")).to_have_count(25)
    await conversations.get_by_role("button", name="Trip plans 3", exact=True).click()
    await expect(conversations).to_be_hidden()  # folds away once one is open
    await toggle.click()
    await expect(
        conversations.get_by_role("button", name="Trip plans 3", exact=True)
    ).to_have_attribute("aria-current", "true")

    await ask(phone, "a" * 150)  # one long word: it wraps, the page does not scroll sideways
    assert await phone.evaluate("document.documentElement.scrollWidth") <= 390

    await phone.reload()
    await phone.keyboard.press("Tab")
    skip = phone.get_by_role("link", name="Skip to content")
    await expect(skip).to_be_focused()
    await phone.keyboard.press("Enter")
    await expect(phone.locator("main")).to_be_focused()
    assert phone.url.endswith("#/chat")  # still the chat page (the pages route by the hash)
    await expect(phone.get_by_role("heading", name="Chat")).to_be_visible()
    await phone.keyboard.press("Tab")  # the next stop is in the content, not the header
    assert await phone.evaluate("document.querySelector('main').contains(document.activeElement)")

    href = await phone.locator("link[rel=icon]").get_attribute("href")
    assert href is not None
    assert href.startswith("/assets/")  # served by the server itself, no CDN
    icon = await phone.request.get(server.http_url + href)
    assert icon.ok
    assert icon.headers["content-type"].startswith("image/svg+xml")
    assert b"<svg" in await icon.body()
