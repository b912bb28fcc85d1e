"""Bad input answers a typed 4xx, never a 500: text PostgreSQL cannot store (NUL, lone
surrogates) in every field that reaches it, numbers out of range, request bodies of the wrong
shape, invalid UTF-8, JSON bombs, broken multipart uploads."""

from __future__ import annotations

import json
from typing import Any

import pytest
from graphql import parse, validate
from httpx import AsyncClient, Response
from sqlalchemy import text

from backend.config import GraphQLSettings
from backend.core.db import Database
from backend.errors import BAD_VALUE_MESSAGE, is_bad_value
from backend.graphql.extensions import shape_error
from backend.graphql.schema import build_schema
from tests.accounts import Account
from tests.conftest import LiveServer

NUL = "a\x00b"
SURROGATE = "a\ud800b"
BAD_TEXT = pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "lone-surrogate"])
TYPED = {"BAD_USER_INPUT", "GRAPHQL_PARSE_FAILED", "GRAPHQL_VALIDATION_FAILED", "BAD_REQUEST"}

# (operation, variables with "$BAD" where the bad text goes): every string that reaches storage
OPERATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "createConversation.title": (
        "mutation($v: String!) { createConversation(title: $v) { id } }",
        {"v": "$BAD"},
    ),
    "search.query": ("query($v: String!) { search(query: $v) { chunkId } }", {"v": "$BAD"}),
    "search.filter key": (
        'query($f: JSON) { search(query: "x", filter: $f) { chunkId } }',
        {"f": {"$BAD": "x"}},
    ),
    "createApiKey.name": (
        "mutation($v: String!) { createApiKey(name: $v) { secret } }",
        {"v": "$BAD"},
    ),
    "createApiKey.scopes": (
        'mutation($v: String!) { createApiKey(name: "k", scopes: [$v]) { secret } }',
        {"v": "$BAD"},
    ),
    "inviteUser.email": (
        "mutation($v: String!) { inviteUser(email: $v) { __typename } }",
        {"v": "$BAD"},
    ),
    "inviteUser.displayName": (
        'mutation($v: String!) { inviteUser(email: "x@y.example", displayName: $v) '
        "{ __typename } }",
        {"v": "$BAD"},
    ),
    "auditEvents.event": ("query($v: String) { auditEvents(event: $v) { id } }", {"v": "$BAD"}),
    "auditEvents.before": ("query($v: ID) { auditEvents(before: $v) { id } }", {"v": "$BAD"}),
    "updateGuardrailPolicy.change value": (
        "mutation($c: JSON!) { updateGuardrailPolicy(change: $c) { __typename } }",
        {"c": {"pii": {"kinds": ["$BAD"]}}},
    ),
    "updateGuardrailPolicy.change key": (
        "mutation($c: JSON!) { updateGuardrailPolicy(change: $c) { __typename } }",
        {"c": {"$BAD": 1}},
    ),
    "login.tenant": (
        'mutation($v: String!) { login(tenant: $v, email: "a@b.c", password: "p") '
        "{ accessToken } }",
        {"v": "$BAD"},
    ),
    "login.email": (
        'mutation($v: String!) { login(tenant: "default", email: $v, password: "p") '
        "{ accessToken } }",
        {"v": "$BAD"},
    ),
    "logout.refreshToken": ("mutation($v: String!) { logout(refreshToken: $v) }", {"v": "$BAD"}),
    "ingestDocument.source": (
        'mutation($v: String!) { ingestDocument(text: "hello", source: $v) { id } }',
        {"v": "$BAD"},
    ),
    "ingestDocument.title": (
        'mutation($v: String!) { ingestDocument(text: "hello", title: $v) { id } }',
        {"v": "$BAD"},
    ),
    "ingestDocument.text": (
        "mutation($v: String!) { ingestDocument(text: $v) { id } }",
        {"v": "$BAD"},
    ),
    "ingestDocument.metadata key": (
        'mutation($m: JSON) { ingestDocument(text: "hello", metadata: $m) { id } }',
        {"m": {"$BAD": "x"}},
    ),
    "ingestDocument.metadata nested value": (
        'mutation($m: JSON) { ingestDocument(text: "hello", metadata: $m) { id } }',
        {"m": {"tags": [{"k": "$BAD"}]}},
    ),
    "guardrailCheck.text": (
        "query($v: String!) { guardrailCheck(text: $v) { __typename } }",
        {"v": "$BAD"},
    ),
    "conversations.after": (
        "query($v: String) { conversations(after: $v) { edges { cursor } } }",
        {"v": "$BAD"},
    ),
    "documents.after": (
        "query($v: String) { documents(after: $v) { edges { cursor } } }",
        {"v": "$BAD"},
    ),
    "visionJob.id": ("query($v: ID!) { visionJob(id: $v) { id } }", {"v": "$BAD"}),
}


def _with(value: Any, bad: str) -> Any:
    if value == "$BAD":
        return bad
    if isinstance(value, dict):
        return {_with(k, bad): _with(v, bad) for k, v in value.items()}
    if isinstance(value, list):
        return [_with(v, bad) for v in value]
    return value


async def post_json(client: AsyncClient, body: Any, headers: dict[str, str]) -> Response:
    """The body as JSON with every non-ASCII character escaped (a lone surrogate stays a
    `\\ud800` escape, as a JavaScript client would send it)."""
    return await client.post(
        "/graphql",
        content=json.dumps(body).encode(),
        headers={"content-type": "application/json", **headers},
    )


def assert_typed_graphql(response: Response) -> dict[str, Any]:
    assert response.status_code < 500, response.text
    body = response.json()
    codes = {e["extensions"]["code"] for e in body["errors"]}
    assert codes <= TYPED, body
    return body


def test_the_operations_are_valid_documents() -> None:
    """So that the tests below fail on the bad text, not on a mistyped field."""
    schema = build_schema(GraphQLSettings())._schema
    for name, (query, _) in OPERATIONS.items():
        assert validate(schema, parse(query)) == [], name


@BAD_TEXT
@pytest.mark.parametrize("name", list(OPERATIONS))
async def test_unstorable_text_in_a_variable_is_bad_user_input(
    client: AsyncClient, owner: Account, name: str, bad: str
) -> None:
    query, variables = OPERATIONS[name]
    response = await post_json(
        client, {"query": query, "variables": _with(variables, bad)}, owner.headers
    )
    body = assert_typed_graphql(response)
    assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT", body


@pytest.mark.parametrize(
    "literal",
    [
        'createConversation(title: "a\\u0000b") { id }',
        'createConversation(title: "a\\u{0}b") { id }',
        'ingestDocument(text: "x", metadata: {k: ["a\\u0000"]}) { id }',
        'createApiKey(name: """a\x00b""") { key }',
    ],
)
async def test_unstorable_text_in_a_literal_is_bad_user_input(
    client: AsyncClient, owner: Account, literal: str
) -> None:
    response = await post_json(client, {"query": f"mutation {{ {literal} }}"}, owner.headers)
    assert_typed_graphql(response)


async def test_a_lone_surrogate_literal_is_a_parse_error(
    client: AsyncClient, owner: Account
) -> None:
    for source in ['"a\\ud800b"', f'"{SURROGATE}"']:
        query = f"mutation {{ createConversation(title: {source}) {{ id }} }}"
        body = assert_typed_graphql(await post_json(client, {"query": query}, owner.headers))
        assert body["errors"][0]["extensions"]["code"] == "GRAPHQL_PARSE_FAILED"


async def test_a_default_value_with_a_nul_is_refused(client: AsyncClient, owner: Account) -> None:
    query = 'mutation($t: String! = "a\\u0000") { createConversation(title: $t) { id } }'
    assert_typed_graphql(await post_json(client, {"query": query}, owner.headers))


async def test_an_audit_cursor_out_of_range_is_bad_user_input(
    client: AsyncClient, owner: Account
) -> None:
    for before in ["9223372036854775808", "-1", "0", "99999999999999999999999"]:
        response = await post_json(
            client,
            {"query": f'{{ auditEvents(before: "{before}") {{ id }} }}'},
            owner.headers,
        )
        body = assert_typed_graphql(response)
        assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    ok = await post_json(client, {"query": '{ auditEvents(before: "1") { id } }'}, owner.headers)
    assert ok.json()["data"] == {"auditEvents": []}


@pytest.mark.parametrize(
    "form",
    [
        {"grant_type": "password", "tenant": "default", "username": NUL, "password": "x"},
        {"grant_type": "password", "tenant": "de\x00fault", "username": "a@b.c", "password": "x"},
        {"grant_type": "password", "tenant": "default", "username": "a@b.c", "password": NUL},
        {"grant_type": "client_credentials", "client_id": "a\x00", "client_secret": "x"},
        {"grant_type": "client_credentials", "client_id": "a", "client_secret": NUL},
        {"grant_type": "refresh_token", "refresh_token": NUL},
        {"grant_type": "pass\x00word"},
        {"grant_type": "password", "tenant": "default", "username": "a@b.c", "password": "x",
         "scope": "chat\x00"},
    ],
)  # fmt: skip
async def test_the_token_endpoint_refuses_unstorable_fields(
    client: AsyncClient, form: dict[str, str]
) -> None:
    response = await client.post("/oauth/token", data=form)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_request"


async def test_the_token_endpoint_with_invalid_utf8_fields(client: AsyncClient) -> None:
    # %ED%A0%80 is U+D800 in (invalid) UTF-8; %FF is no UTF-8 at all
    for raw in [b"username=%ED%A0%80", b"username=%FF", b"tenant=%C0%80"]:
        response = await client.post(
            "/oauth/token",
            content=b"grant_type=password&password=x&tenant=default&" + raw,
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert 400 <= response.status_code < 500, response.text


async def test_revoking_a_token_with_a_nul_is_still_200(client: AsyncClient) -> None:
    response = await client.post("/oauth/revoke", data={"token": NUL})
    assert response.status_code == 200


BODIES: dict[str, bytes] = {
    "null": b"null",
    "a string": b'"query"',
    "a number": b"5",
    "a list of scalars": b'[1,"x",null]',
    "a list of lists": b'[[{"query":"{ serverInfo { version } }"}]]',
    "an empty list": b"[]",
    "query a number": b'{"query": 5}',
    "query an object": b'{"query": {"a": 1}}',
    "variables a list": b'{"query": "{ serverInfo { version } }", "variables": [1]}',
    "operationName a number": b'{"query": "{ serverInfo { version } }", "operationName": 1}',
    "extensions a string": b'{"query": "{ serverInfo { version } }", "extensions": "x"}',
    "a batch item a number": b'[{"query": "{ serverInfo { version } }"}, 1]',
    "a batch item with query a number": b'[{"query": 5}]',
    "invalid UTF-8": b'{"query": "\xff\xfe"}',
    "a lone surrogate in UTF-8": b'{"query": "\xed\xa0\x80"}',
    "NaN": b'{"query": "{ serverInfo { version } }", "variables": {"x": NaN}}',
    "an integer of 5000 digits": b'{"query": "x", "variables": {"x": ' + b"1" * 5000 + b"}}",
    "nested 100,000 deep": b"[" * 100_000 + b"]" * 100_000,
    "objects nested 100,000 deep": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "a variable nested 5,000 deep": (
        b'{"query": "query($f: JSON) { search(query: \\"x\\", filter: $f) { chunkId } }", '
        b'"variables": {"f": ' + b"[" * 5000 + b"]" * 5000 + b"}}"
    ),
    "a variable nested 65 deep": (
        b'{"query": "query($f: JSON) { search(query: \\"x\\", filter: $f) { chunkId } }", '
        b'"variables": {"f": ' + b'{"a":' * 65 + b"1" + b"}" * 65 + b"}}"
    ),
    "a million tiny values": b"[" + b"0," * 1_000_000 + b"0]",
    "truncated": b'{"query": "{ serverInfo',
    "empty": b"",
}


@pytest.mark.parametrize("name", list(BODIES))
async def test_a_malformed_body_is_a_typed_400(client: AsyncClient, name: str) -> None:
    response = await client.post(
        "/graphql", content=BODIES[name], headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    error = response.json()["errors"][0]
    assert error["extensions"]["code"] == "BAD_REQUEST"
    assert error["message"]


async def test_json_at_the_depth_limit_is_read(client: AsyncClient) -> None:
    """64 levels (the default limit), the operation's object included, are read: the variable
    reaches the field (which then wants a signed-in admin)."""
    nested: Any = "x"
    for _ in range(62):  # body {variables {c: ...}}: two levels around it
        nested = {"a": nested}
    query = "mutation($c: JSON!) { updateGuardrailPolicy(change: $c) { __typename } }"
    response = await client.post("/graphql", json={"query": query, "variables": {"c": nested}})
    assert response.status_code == 200, response.text
    assert response.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    nested = {"a": nested}
    response = await client.post("/graphql", json={"query": query, "variables": {"c": nested}})
    assert response.status_code == 400, response.text
    assert "deeper than 64" in response.json()["errors"][0]["message"]


async def test_a_get_with_bad_variables_is_a_typed_400(client: AsyncClient) -> None:
    query = "query($f: JSON) { serverInfo { version } }"
    for variables in ["[" * 5000 + "]" * 5000, "null5", "[1]", '"x"']:
        response = await client.get(
            "/graphql",
            params={"query": query, "variables": variables},
            headers={"accept": "application/json"},
        )
        assert response.status_code == 400, (variables, response.text)
        assert response.json()["errors"][0]["extensions"]["code"] == "BAD_REQUEST"


# Vision is off in these tests: the upload reaches the resolver, which answers
# SERVICE_UNAVAILABLE once it has read the file (nothing heavy starts).
ANALYZE = "mutation($f: Upload!) { analyzeImage(image: $f, tasks: [DETECT]) { id } }"


async def multipart(
    client: AsyncClient,
    account: Account,
    operations: Any,
    files_map: Any,
    files: dict[str, tuple[str, bytes, str]] | None = None,
) -> Response:
    return await client.post(
        "/graphql",
        data={
            "operations": operations if isinstance(operations, str) else json.dumps(operations),
            "map": files_map if isinstance(files_map, str) else json.dumps(files_map),
        },
        files=files or {"0": ("photo.jpg", b"not really a jpeg", "image/jpeg")},
        headers=account.headers,
    )


@pytest.mark.parametrize(
    ("operations", "files_map"),
    [
        ({"query": ANALYZE, "variables": {"f": "string"}}, {"0": ["variables.f.0"]}),
        ({"query": ANALYZE, "variables": {"f": [1]}}, {"0": ["variables.f.x"]}),
        ({"query": ANALYZE, "variables": {"f": [1]}}, {"0": ["variables.f.5"]}),
        ({"query": ANALYZE, "variables": {"f": None}}, {"0": ["variables.g.h"]}),
        ({"query": ANALYZE, "variables": {"f": None}}, {"0": ["query"]}),
        ({"query": ANALYZE, "variables": {"f": None}}, {"0": "variables.f"}),
        ({"query": ANALYZE, "variables": {"f": None}}, {"0": [1]}),
        ({"query": ANALYZE, "variables": {"f": None}}, ["variables.f"]),
        ({"query": ANALYZE, "variables": {"f": None}}, {"1": ["variables.f"]}),
        ({"query": ANALYZE, "variables": {"f": None}}, "null"),
        ("null", {"0": ["variables.f"]}),
        ("[1]", {"0": ["0.variables.f"]}),
        ({"query": ANALYZE, "variables": {"f": None}}, "{not json"),
    ],
)
async def test_a_broken_multipart_request_is_a_typed_400(
    client: AsyncClient, owner: Account, operations: Any, files_map: Any
) -> None:
    response = await multipart(client, owner, operations, files_map)
    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["extensions"]["code"] == "BAD_REQUEST"


async def test_a_multipart_request_without_its_fields_is_a_typed_400(
    client: AsyncClient, owner: Account
) -> None:
    response = await client.post(
        "/graphql",
        files={"0": ("notes.txt", b"hello", "text/plain")},
        headers=owner.headers,
    )
    assert response.status_code == 400, response.text


@pytest.mark.parametrize(
    ("disposition", "code"),
    [
        (b'filename=""', "SERVICE_UNAVAILABLE"),  # an empty name: still a file
        (b'filename="a\x00b.jpg"', "BAD_USER_INPUT"),
    ],
)
async def test_uploads_with_an_empty_or_unstorable_file_name(
    client: AsyncClient, owner: Account, disposition: bytes, code: str
) -> None:
    operations = json.dumps({"query": ANALYZE, "variables": {"f": None}}).encode()
    body = (
        b'--B\r\nContent-Disposition: form-data; name="operations"\r\n\r\n'
        + operations
        + b'\r\n--B\r\nContent-Disposition: form-data; name="map"\r\n\r\n{"0": ["variables.f"]}'
        + b'\r\n--B\r\nContent-Disposition: form-data; name="0"; '
        + disposition
        + b"\r\nContent-Type: image/jpeg\r\n\r\nnot really a jpeg\r\n--B--\r\n"
    )
    response = await client.post(
        "/graphql",
        content=body,
        headers={"content-type": "multipart/form-data; boundary=B", **owner.headers},
    )
    assert response.status_code < 500, response.text
    assert response.json()["errors"][0]["extensions"]["code"] == code, response.text


async def test_a_part_without_a_file_name_is_not_a_file(
    client: AsyncClient, owner: Account
) -> None:
    """httpx (and others) send a file with an empty name as a plain field: a 400, not a
    string handed to the resolver as if it were an upload."""
    response = await multipart(
        client,
        owner,
        {"query": ANALYZE, "variables": {"f": None}},
        {"0": ["variables.f"]},
        {"0": ("", b"hello world", "image/jpeg")},
    )
    assert response.status_code == 400, response.text
    assert "not a file" in response.json()["errors"][0]["message"]
    # the map may not name the other fields either
    response = await multipart(
        client, owner, {"query": ANALYZE, "variables": {"f": None}}, {"operations": ["variables.f"]}
    )
    assert response.status_code == 400, response.text


async def test_a_batched_upload_is_placed_in_its_operation(
    client: AsyncClient, owner: Account
) -> None:
    operations = [
        {"query": "{ serverInfo { version } }"},
        {"query": ANALYZE, "variables": {"f": None}},
    ]
    response = await multipart(client, owner, operations, {"0": ["1.variables.f"]})
    assert response.status_code == 200, response.text
    first, second = response.json()
    assert first["data"]["serverInfo"]["version"]
    assert second["errors"][0]["extensions"]["code"] == "SERVICE_UNAVAILABLE", second


@pytest.mark.parametrize(
    ("sql", "value"),
    [
        ("SELECT CAST(:v AS text)", NUL),
        ("SELECT CAST(:v AS text)", SURROGATE),
        ("SELECT CAST(:v AS bigint)", 2**63),
        ("SELECT CAST(:v AS jsonb)", '{"a": "\\u0000"}'),
    ],
)
async def test_a_value_postgresql_refuses_is_bad_user_input_not_a_bug(
    db: Database, sql: str, value: Any
) -> None:
    """The last line behind the edge checks: what asyncpg and PostgreSQL raise for values they
    cannot store is recognised as the client's fault and shaped as BAD_USER_INPUT."""
    from graphql import GraphQLError

    with pytest.raises(Exception) as raised:  # noqa: PT011 (the driver's own exception type)
        async with db.session() as session:
            await session.execute(text(sql), {"v": value})
    assert is_bad_value(raised.value)
    shaped = shape_error(GraphQLError("x", path=["f"], original_error=raised.value))
    assert shaped.extensions == {"code": "BAD_USER_INPUT"}
    assert shaped.message == BAD_VALUE_MESSAGE


async def test_a_subscription_with_unstorable_text_is_refused(live_server: LiveServer) -> None:
    """Subscriptions go through the same check, before any resolver (here over HTTP as
    Server-Sent Events; the WebSocket transports run the same schema)."""
    query = 'subscription($a: String) { runEvents(runId: "x", after: $a) { cursor } }'
    async with AsyncClient() as http:
        response = await http.post(
            f"{live_server.http_url}/graphql",
            content=json.dumps({"query": query, "variables": {"a": NUL}}).encode(),
            headers={"content-type": "application/json", "accept": "text/event-stream"},
            timeout=30,
        )
    assert response.status_code < 500, response.text
    assert "BAD_USER_INPUT" in response.text
    assert "INTERNAL_SERVER_ERROR" not in response.text


async def test_socket_messages_are_bounded_json_too(live_server: LiveServer) -> None:
    """A JSON bomb on the GraphQL socket is a malformed message (close 4400), not a crash of
    the connection handler; a NUL in a subscription's variables is BAD_USER_INPUT."""
    from websockets.exceptions import ConnectionClosed

    from tests.graphql.ws import init, open_socket, receive, subscribe

    async with await open_socket(live_server.ws_url) as ws:
        await init(ws)
        await ws.send("[" * 100_000 + "]" * 100_000)
        with pytest.raises(ConnectionClosed) as closed:
            await receive(ws)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4400

    async with await open_socket(live_server.ws_url) as ws:
        await init(ws)
        query = 'subscription($a: String) { runEvents(runId: "x", after: $a) { cursor } }'
        await subscribe(ws, query, {"a": NUL})
        message = await receive(ws)
        assert message["type"] == "next", message  # refused at execution: no event follows
        assert message["payload"]["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
        assert (await receive(ws))["type"] == "complete"
