"""Conversations and messages through GraphQL: ownership, pagination, bad input."""

from __future__ import annotations

from typing import Any

from httpx import AsyncClient

from backend.conversations.service import title_of
from backend.core.models import MessageRole
from backend.services import Services
from tests.accounts import Account
from tests.auth.test_graphql_auth import code, gql

CREATE = "mutation($t: String!) { createConversation(title: $t) { id title archived } }"


async def _create(client: AsyncClient, account: Account, title: str) -> dict[str, Any]:
    return (await gql(client, CREATE, account.headers, t=title))["data"]["createConversation"]


async def test_create_list_page_rename_archive_delete(client: AsyncClient, member: Account) -> None:
    ids = [(await _create(client, member, f"  chat   {i} "))["id"] for i in range(5)]
    first = await gql(
        client,
        "{ conversations(first: 2) { edges { node { id title } cursor } "
        "pageInfo { hasNextPage endCursor } } }",
        member.headers,
    )
    page = first["data"]["conversations"]
    assert [e["node"]["id"] for e in page["edges"]] == ids[::-1][:2]  # newest first
    assert page["edges"][0]["node"]["title"] == "chat 4"  # whitespace normalised
    assert page["pageInfo"]["hasNextPage"] is True
    rest = await gql(
        client,
        "query($a: String) { conversations(first: 10, after: $a) "
        "{ edges { node { id } } pageInfo { hasNextPage } } }",
        member.headers,
        a=page["pageInfo"]["endCursor"],
    )
    assert [e["node"]["id"] for e in rest["data"]["conversations"]["edges"]] == ids[::-1][2:]
    assert rest["data"]["conversations"]["pageInfo"]["hasNextPage"] is False

    renamed = await gql(
        client,
        'mutation($id: ID!) { renameConversation(id: $id, title: "x") { title } }',
        member.headers,
        id=ids[0],
    )
    assert renamed["data"]["renameConversation"]["title"] == "x"
    await gql(
        client,
        "mutation($id: ID!) { archiveConversation(id: $id) { archived } }",
        member.headers,
        id=ids[1],
    )
    active = await gql(client, "{ conversations { edges { node { id } } } }", member.headers)
    assert ids[1] not in {e["node"]["id"] for e in active["data"]["conversations"]["edges"]}
    archived = await gql(
        client, "{ conversations(archived: true) { edges { node { id } } } }", member.headers
    )
    assert [e["node"]["id"] for e in archived["data"]["conversations"]["edges"]] == [ids[1]]
    deleted = await gql(
        client, "mutation($id: ID!) { deleteConversation(id: $id) }", member.headers, id=ids[2]
    )
    assert deleted["data"]["deleteConversation"] is True
    gone = await gql(
        client, "query($id: ID!) { conversation(id: $id) { id } }", member.headers, id=ids[2]
    )
    assert code(gone) == "NOT_FOUND"


async def test_messages_page_in_order(
    client: AsyncClient, member: Account, services: Services, app: Any
) -> None:
    conversation = await _create(client, member, "history")
    principal = await services.auth.authenticate(member.access_token)
    convo = await services.conversations.get(principal, __import__("uuid").UUID(conversation["id"]))
    async with app.state.sightline.db.session(principal.tenant_id) as session:
        for i in range(5):
            await services.conversations.append(
                session, convo, MessageRole.USER, f"m{i}", author_id=principal.user_id
            )
    query = (
        "query($id: ID!, $a: String) { conversation(id: $id) { messages(first: 3, after: $a)"
        " { edges { node { content role complete } cursor } pageInfo { hasNextPage "
        "endCursor } } } }"
    )
    first = (await gql(client, query, member.headers, id=conversation["id"]))["data"]
    messages = first["conversation"]["messages"]
    assert [e["node"]["content"] for e in messages["edges"]] == ["m0", "m1", "m2"]
    second = (
        await gql(
            client,
            query,
            member.headers,
            id=conversation["id"],
            a=messages["pageInfo"]["endCursor"],
        )
    )["data"]
    assert [e["node"]["content"] for e in second["conversation"]["messages"]["edges"]] == [
        "m3",
        "m4",
    ]


async def test_other_users_and_tenants_conversations_are_not_found(
    client: AsyncClient, owner: Account, member: Account, stranger: Account
) -> None:
    mine = await _create(client, member, "private")
    for account in (owner, stranger):  # a colleague, and another tenant's owner
        body = await gql(
            client,
            "query($id: ID!) { conversation(id: $id) { id } }",
            account.headers,
            id=mine["id"],
        )
        assert code(body) == "NOT_FOUND"
        body = await gql(
            client,
            "mutation($id: ID!) { deleteConversation(id: $id) }",
            account.headers,
            id=mine["id"],
        )
        assert code(body) == "NOT_FOUND"


async def test_bad_input(client: AsyncClient, member: Account) -> None:
    assert code(await gql(client, CREATE, member.headers, t="x" * 201)) == "BAD_USER_INPUT"
    bad_cursor = await gql(
        client, '{ conversations(after: "garbage") { edges { cursor } } }', member.headers
    )
    assert code(bad_cursor) == "BAD_USER_INPUT"
    too_many = await gql(
        client, "{ conversations(first: 1000) { edges { cursor } } }", member.headers
    )
    assert code(too_many) == "BAD_USER_INPUT"
    bad_id = await gql(client, '{ conversation(id: "nope") { id } }', member.headers)
    assert code(bad_id) == "BAD_USER_INPUT"
    anonymous = await gql(client, "{ conversations { edges { cursor } } }")
    assert code(anonymous) == "UNAUTHENTICATED"


def test_a_title_made_of_a_question() -> None:
    assert title_of("What is the capital of France?", 48) == "What is the capital of France?"
    assert title_of("\n\n## How do **refunds** work?\nMore detail here.", 48) == (
        "How do refunds work?"  # its first line with text, without Markdown marks
    )
    listed = title_of("- `pip install` fails   with\tan error", 48)
    assert listed == "pip install fails with an error"
    long = "Refunds: how long do they take for orders placed abroad, and who pays shipping?"
    assert title_of(long, 48) == "Refunds: how long do they take for orders…"
    assert len(title_of(long, 48)) <= 48
    assert title_of("x" * 100, 10) == "x" * 9 + "…"  # no word boundary: cut in the word
    assert title_of("```\n```", 48) == ""
    assert len(title_of("word " * 100, 1000)) <= 200  # never over the longest title
