"""Failed sign-ins: guessing is slowed and audited, and no attacker can lock a victim out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
from fastapi import FastAPI
from httpx import ASGITransport, AsyncClient

from backend.auth.throttle import source_of
from backend.config import Settings
from tests.accounts import PASSWORD, Account, token
from tests.conftest import serve_live

FREE = 3
SOURCE_FAILURES = 12
ACCOUNT_FAILURES = 8

Source = Callable[[str], AbstractAsyncContextManager[AsyncClient]]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Off: loading the rails' classifier takes seconds of CPU, a start under load would time out
    settings.guardrails.enabled = False
    auth = settings.auth
    auth.login_free_attempts = FREE
    # Longer than an attempt takes on a busy machine: a refusal is not a race with the clock.
    auth.login_backoff_base_s = 2.0
    auth.login_backoff_max_s = 8.0
    auth.login_source_failures = SOURCE_FAILURES
    auth.login_account_failures = ACCOUNT_FAILURES
    return settings


@pytest.fixture
def source(app: FastAPI) -> Source:
    """A client calling from the given address."""

    @asynccontextmanager
    async def open_client(ip: str) -> AsyncIterator[AsyncClient]:
        transport = ASGITransport(app=app.state.asgi, client=(ip, 40000))
        async with AsyncClient(transport=transport, base_url="http://sightline.test") as http:
            yield http

    return open_client


async def sign_in(http: AsyncClient, account: Account, password: str) -> dict[str, Any]:
    return await token(
        http,
        grant_type="password",
        tenant=account.tenant.slug,
        username=account.email,
        password=password,
    )


async def fail_until_slowed(http: AsyncClient, account: Account) -> dict[str, Any]:
    """Wrong passwords until the source is told to wait; returns that answer."""
    for _ in range(FREE + 1):
        body = await sign_in(http, account, "wrong-wrong-wrong")
        if body["status"] == 429:
            return body
        assert body["status"] == 400, body
    raise AssertionError("never slowed down")


async def test_a_guessing_source_waits_and_the_victim_elsewhere_does_not(
    source: Source, member: Account
) -> None:
    async with source("203.0.113.7") as attacker, source("198.51.100.20") as victim:
        slowed = await fail_until_slowed(attacker, member)
        assert slowed["error"] == "slow_down"
        assert slowed["retry_after"] > 0
        # Even the right password waits at the guessing source...
        assert (await sign_in(attacker, member, PASSWORD))["status"] == 429
        # ...but the victim, elsewhere, signs in at once.
        assert (await sign_in(victim, member, PASSWORD))["status"] == 200


async def test_a_right_password_passes_after_the_backoff(source: Source, member: Account) -> None:
    """The victim who mistyped at their own address: a short wait, never a lockout."""
    async with source("203.0.113.8") as http:
        slowed = await fail_until_slowed(http, member)
        await asyncio.sleep(slowed["retry_after"] + 0.05)
        assert (await sign_in(http, member, PASSWORD))["status"] == 200
        # Success starts the source afresh: the next mistake is free again.
        assert (await sign_in(http, member, "wrong-wrong-wrong"))["status"] == 400


async def test_the_backoff_grows_with_each_failure(source: Source, member: Account) -> None:
    async with source("203.0.113.9") as http:
        first = await fail_until_slowed(http, member)
        await asyncio.sleep(first["retry_after"] + 0.05)
        assert (await sign_in(http, member, "wrong-wrong-wrong"))["status"] == 400
        second = await sign_in(http, member, "wrong-wrong-wrong")
    assert second["status"] == 429
    assert first["retry_after"] < second["retry_after"] <= 8.0


async def test_parallel_guesses_cannot_slip_past_the_count(settings: Settings) -> None:
    """On a server of its own (a real connection pool): twenty guesses at once."""
    async with serve_live(settings) as server, AsyncClient(base_url=server.http_url) as http:
        answers = await asyncio.gather(
            *(
                token(
                    http,
                    grant_type="password",
                    tenant="some-tenant",
                    username="someone@example.com",
                    password=f"guess-number-{i}",
                )
                for i in range(20)
            )
        )
    statuses = [a["status"] for a in answers]
    assert statuses.count(400) == FREE  # only the free attempts reached the password check
    assert statuses.count(429) == 20 - FREE


async def test_spraying_many_accounts_from_one_source_is_refused(
    source: Source, member: Account, owner: Account
) -> None:
    async with source("203.0.113.11") as sprayer, source("198.51.100.21") as user:
        statuses = []
        for i in range(SOURCE_FAILURES + 2):
            body = await token(
                sprayer,
                grant_type="password",
                tenant=member.tenant.slug,
                username=f"user{i}@{member.tenant.slug}.example",
                password="Winter2026!",
            )
            statuses.append(body["status"])
        assert statuses[:SOURCE_FAILURES] == [400] * SOURCE_FAILURES
        assert statuses[SOURCE_FAILURES:] == [429, 429]
        # The sprayer is refused for any account, right password included; others are not.
        assert (await sign_in(sprayer, owner, PASSWORD))["status"] == 429
        assert (await sign_in(user, owner, PASSWORD))["status"] == 200


async def test_a_distributed_attack_cannot_lock_out_a_trusted_source(
    source: Source, member: Account
) -> None:
    async with source("198.51.100.30") as home:
        assert (await sign_in(home, member, PASSWORD))["status"] == 200  # trusted from now on
    for i in range(ACCOUNT_FAILURES):
        async with source(f"192.0.2.{i + 1}") as bot:
            assert (await sign_in(bot, member, "wrong-wrong-wrong"))["status"] == 400
    async with source("192.0.2.200") as new_bot:
        refused = await sign_in(new_bot, member, PASSWORD)
        assert refused["status"] == 429  # a source the account never signed in from
    async with source("198.51.100.30") as home:
        assert (await sign_in(home, member, PASSWORD))["status"] == 200


async def test_refusals_are_audited_for_the_tenant(
    source: Source, member: Account, owner: Account, client: AsyncClient
) -> None:
    async with source("203.0.113.12") as http:
        await fail_until_slowed(http, member)
    data = {}
    for name, query in {
        "a": '{ auditEvents(event: "login", first: 100) { outcome details } }',
        "b": '{ auditEvents(event: "login.throttled") { outcome ip details } }',
    }.items():  # one request each: the test's database is one connection
        audit = await client.post("/graphql", json={"query": query}, headers=owner.headers)
        data[name] = audit.json()["data"]["auditEvents"]
    failures = [e for e in data["a"] if e["outcome"] == "failure"]
    assert len(failures) == FREE
    assert all(e["details"]["email"] == member.email for e in failures)
    assert [(e["outcome"], e["ip"], e["details"]["limit"]) for e in data["b"]] == [
        ("denied", "203.0.113.12", "account_source")
    ]


async def test_the_graphql_login_is_throttled_alike(source: Source, member: Account) -> None:
    mutation = (
        "mutation($t: String!, $e: String!, $p: String!) "
        "{ login(tenant: $t, email: $e, password: $p) { accessToken } }"
    )
    variables = {"t": member.tenant.slug, "e": member.email, "p": "wrong-wrong-wrong"}
    async with source("203.0.113.13") as http:
        codes = []
        for _ in range(FREE + 1):
            body = (
                await http.post("/graphql", json={"query": mutation, "variables": variables})
            ).json()
            codes.append(body["errors"][0]["extensions"]["code"])
    assert codes == ["INVALID_GRANT"] * FREE + ["RATE_LIMITED"]


def test_sources_are_addresses_and_ipv6_networks() -> None:
    assert source_of("203.0.113.7") == "203.0.113.7"
    assert source_of("::ffff:203.0.113.7") == "203.0.113.7"
    assert source_of("2001:db8:1:2:aaaa::1") == source_of("2001:db8:1:2:bbbb::9")
    assert source_of("2001:db8:1:2::1") != source_of("2001:db8:1:3::1")
    assert source_of(None) == source_of("not an address") == "unknown"
