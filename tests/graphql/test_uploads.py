"""Multipart uploads: one file mapped to several variables is read whole by each."""

from __future__ import annotations

import json
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.config import Settings
from tests.agents.test_runs import account, chat_settings, llm, sign_in  # noqa: F401 (fixtures)
from tests.conftest import serve_live

INGEST = """mutation Ingest($file: Upload!, $source: String) {
  ingestDocument(file: $file, source: $source) { id source } }"""


async def test_one_file_mapped_to_two_operations_of_a_batch(
    chat_settings: Settings,  # noqa: F811
    engine: AsyncEngine,
    account: dict[str, Any],  # noqa: F811
) -> None:
    """The multipart spec allows it (Apollo's upload client does it when a File is reused);
    the second operation read an empty file: UNREADABLE_DOCUMENT "the document is empty".
    (A live server: the operations of a batch run at once, on connections of their own.)"""
    operations = [
        {"query": INGEST, "variables": {"file": None, "source": source}}
        for source in ("first.md", "second.md")
    ]
    async with serve_live(chat_settings) as server:
        token = await sign_in(server, account)
        async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as http:
            response = await http.post(
                "/graphql",
                data={
                    "operations": json.dumps(operations),
                    "map": json.dumps({"0": ["0.variables.file", "1.variables.file"]}),
                },
                files={"0": ("notes.md", b"# Notes\n\nThe same file, twice.\n", "text/markdown")},
                headers={"authorization": f"Bearer {token}"},
            )
    assert response.status_code == 200, response.text
    results = response.json()
    assert [r.get("errors") for r in results] == [None, None], results
    assert [r["data"]["ingestDocument"]["source"] for r in results] == ["first.md", "second.md"]
