"""What auth and rate limiting add to each request: p50/p99 latency, measured in one run.

The same operation (`{ serverInfo { version } }`) is sent straight into the ASGI app (no
sockets, so the figures are the server's own work) in three ways, interleaved round by round:

- baseline: no credential, rate limits disabled;
- JWT: a bearer access token (Ed25519 verification) and the Redis rate-limit script;
- API key: an API key (one PostgreSQL lookup) and the Redis rate-limit script.

Needs the Redis at 127.0.0.1:6379 (or SIGHTLINE_REDIS_URL) and an embedded PostgreSQL (or
SIGHTLINE_DATABASE_URL). Usage: python bench/limits.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from asgi_lifespan import LifespanManager
from pydantic import SecretStr

from backend.app import create_app
from backend.config import (
    DatabaseSettings,
    LimitsSettings,
    LogFormat,
    RateSpec,
    RedisSettings,
    Settings,
    TelemetrySettings,
)
from backend.core.embedded import EmbeddedPostgres
from backend.core.models import UserRole

BODY = json.dumps({"query": "{ serverInfo { version } }"}).encode()


def request_caller(app: Any, credential: str | None) -> Callable[[], Awaitable[float]]:
    headers = [
        (b"host", b"bench"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(BODY)).encode()),
    ]
    if credential:
        headers.append((b"authorization", f"Bearer {credential}".encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/graphql",
        "raw_path": b"/graphql",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 80),
    }

    async def call() -> float:
        sent = False
        chunks: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": BODY, "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        started = time.perf_counter()
        await app(dict(scope), receive, send)
        elapsed = time.perf_counter() - started
        body = json.loads(b"".join(chunks))
        if "errors" in body:
            raise SystemExit(f"request failed: {body['errors']}")
        return elapsed

    return call


def percentile(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=1000)[round(q * 1000) - 1]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per variant")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sightline-bench-limits-"))
    embedded = None
    database_url = os.environ.get("SIGHTLINE_DATABASE_URL")
    if not database_url:
        embedded = EmbeddedPostgres(work / "pg")
        database_url = embedded.start()
    unlimited = RateSpec(rate_per_s=1e9, burst=1_000_000_000)  # checked, never refusing
    base = Settings(
        data_dir=work,
        database=DatabaseSettings(url=SecretStr(database_url), migrate_on_start=True),
        redis=RedisSettings(
            url=SecretStr(os.environ.get("SIGHTLINE_REDIS_URL", "redis://127.0.0.1:6379/0")),
            key_prefix=f"bench:{uuid.uuid4().hex[:8]}:",
        ),
        telemetry=TelemetrySettings(log_format=LogFormat.TEXT, log_level="WARNING"),
        limits=LimitsSettings(rates={"free": {"query": unlimited}}),
    )
    plain = base.model_copy(update={"limits": LimitsSettings(enabled=False)})
    guarded_app, plain_app = create_app(base), create_app(plain)
    try:
        async with LifespanManager(guarded_app) as guarded, LifespanManager(plain_app) as bare:
            services = guarded._state["services"]
            tenant = await services.auth.ensure_tenant(f"bench-{uuid.uuid4().hex[:6]}", "Bench")
            await services.auth.create_user(
                tenant_id=tenant.id,
                email="bench@bench.example",
                password="bench-password-123",
                role=UserRole.MEMBER,
            )
            tokens = await services.auth.password_grant(
                tenant.slug, "bench@bench.example", "bench-password-123", None, None
            )
            principal = await services.auth.principal_for(tenant.slug, "bench@bench.example")
            key = await services.auth.create_api_key(principal, "bench", None, None)
            variants = {
                "baseline (no auth, no limits)": request_caller(bare.app, None),
                "JWT + rate limit": request_caller(guarded.app, tokens.access_token),
                "API key + rate limit": request_caller(guarded.app, key.secret),
            }
            samples: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(200):  # warm-up
                for call in variants.values():
                    await call()
            for _ in range(args.requests):
                for name, call in variants.items():
                    samples[name].append(await call())
    finally:
        if embedded is not None:
            embedded.stop()

    baseline = samples["baseline (no auth, no limits)"]
    b50, b99 = percentile(baseline, 0.5), percentile(baseline, 0.99)
    print(
        f"limits: {os.cpu_count()} CPUs, in-process ASGI, {args.requests} requests per "
        "variant, interleaved; latency in ms"
    )
    print(f"{'variant':<32}{'p50':>8}{'p99':>8}{'added p50':>11}{'added p99':>11}")
    for name, values in samples.items():
        p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
        print(
            f"{name:<32}{p50 * 1e3:>8.3f}{p99 * 1e3:>8.3f}"
            f"{(p50 - b50) * 1e3:>11.3f}{(p99 - b99) * 1e3:>11.3f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
