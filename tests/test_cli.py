"""The `sightline` command, in-process and (for `serve`) as the real process an operator runs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from typer.testing import CliRunner, Result

from backend import __version__, cli
from backend.app import SCHEMA_FILE, schema_evolution, schema_sdl
from backend.cli import app
from backend.core.migrations import head_revisions
from backend.errors import AppError
from tests.conftest import REDIS_URL, dies_with_tests, free_port, scaled

runner = CliRunner()


@pytest.fixture
def env(database_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {"SIGHTLINE_DATABASE_URL": database_url, "SIGHTLINE_REDIS_URL": REDIS_URL}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def test_version() -> None:
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == __version__


def test_config_prints_every_setting() -> None:
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 0
    assert "SIGHTLINE_DATABASE_URL" in result.stdout
    assert "SIGHTLINE_GRAPHQL_MAX_DEPTH" in result.stdout


def test_committed_schema_file_is_current() -> None:
    result = runner.invoke(app, ["schema", "check"])
    assert result.exit_code == 0, result.output
    assert SCHEMA_FILE.read_text(encoding="utf-8") == schema_sdl()


def test_schema_check_fails_when_the_schema_changes(tmp_path: Path) -> None:
    stale = tmp_path / "schema.graphql"
    stale.write_text(schema_sdl().replace("uptimeSeconds: Float!\n", ""), encoding="utf-8")
    result = runner.invoke(app, ["schema", "check", "--path", str(stale)])
    assert result.exit_code == 1
    assert "stale" in result.output
    assert "+  uptimeSeconds: Float!" in result.output  # the diff shows what changed

    exported = runner.invoke(app, ["schema", "export", "--path", str(stale)])
    assert exported.exit_code == 0
    assert runner.invoke(app, ["schema", "check", "--path", str(stale)]).exit_code == 0


def _released(tmp_path: Path, edit: Callable[[str], str]) -> Path:
    """A copy of the code's schema, edited, as the last release to check against."""
    baseline = tmp_path / "released.graphql"
    edited = edit(schema_sdl())
    assert edited != schema_sdl()
    baseline.write_text(edited, encoding="utf-8")
    return baseline


def _check_against(baseline: Path, *options: str) -> Result:
    return runner.invoke(app, ["schema", "check", "--baseline", str(baseline), *options])


def test_schema_check_fails_on_a_breaking_change_against_the_release(tmp_path: Path) -> None:
    baseline = _released(
        tmp_path,
        lambda sdl: sdl.replace(
            "  uptimeSeconds: Float!\n", "  uptimeSeconds: String!\n  legacyUptime: Int\n"
        ),
    )
    result = _check_against(baseline)
    assert result.exit_code == 1
    assert f"2 breaking change(s) against release {schema_evolution.API_VERSION}" in result.output
    assert "  Field ServerInfo.legacyUptime was removed.\n" in result.output
    assert (
        "  Field ServerInfo.uptimeSeconds changed type from String! to Float!.\n" in result.output
    )
    # what to paste into the changelog to announce them
    assert "- `Field ServerInfo.legacyUptime was removed.`" in result.output
    assert "up to date" in result.output  # schema.graphql itself is current


def test_schema_check_passes_additions(tmp_path: Path) -> None:
    # the release lacks two fields the code has (as when other branches add fields)
    baseline = _released(
        tmp_path,
        lambda sdl: sdl.replace("  uptimeSeconds: Float!\n", "").replace(
            "  apiVersion: String!\n", ""
        ),
    )
    result = _check_against(baseline)
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    assert "keeps every operation of release" in result.output


def test_schema_check_passes_a_breaking_change_the_changelog_announces(tmp_path: Path) -> None:
    baseline = _released(
        tmp_path, lambda sdl: sdl.replace("  uptimeSeconds: Float!\n", "  uptimeSeconds: Int!\n")
    )
    change = "Field ServerInfo.uptimeSeconds changed type from Int! to Float!."
    changelog = tmp_path / "CHANGELOG.md"
    changelog.write_text(
        f"# Changelog\n\n## Unreleased\n\n### Breaking\n\n- `{change}` Seconds have decimals.\n"
        f"\n## {schema_evolution.API_VERSION}\n",
        encoding="utf-8",
    )
    result = _check_against(baseline, "--changelog", str(changelog))
    assert result.exit_code == 0, result.output
    assert f"announced breaking change: {change}" in result.output

    # announced under a released section, it is not an announcement for this change
    changelog.write_text(
        f"# Changelog\n\n## Unreleased\n\n## {schema_evolution.API_VERSION}\n\n"
        f"### Breaking\n\n- `{change}`\n",
        encoding="utf-8",
    )
    assert _check_against(baseline, "--changelog", str(changelog)).exit_code == 1


def test_schema_check_warns_on_dangerous_changes(tmp_path: Path) -> None:
    baseline = _released(tmp_path, lambda sdl: sdl.replace("  VIEWER\n", "", 1))
    result = _check_against(baseline)
    assert result.exit_code == 0, result.output
    assert (
        f"warning: dangerous change against release {schema_evolution.API_VERSION} "
        "(clients may see values they do not expect): Enum value Role.VIEWER was added."
    ) in result.output


def test_schema_check_fails_when_api_version_is_not_the_newest_release(tmp_path: Path) -> None:
    changelog = tmp_path / "CHANGELOG.md"
    changelog.write_text(
        f"## Unreleased\n\n## 2999-01-01\n\n## {schema_evolution.API_VERSION}\n",
        encoding="utf-8",
    )
    result = runner.invoke(app, ["schema", "check", "--changelog", str(changelog)])
    assert result.exit_code == 1
    assert "the newest release in the changelog is 2999-01-01" in result.output


def test_schema_check_fails_clearly_without_a_readable_released_schema(tmp_path: Path) -> None:
    result = _check_against(tmp_path / "released.graphql")
    assert result.exit_code == 1
    assert "released.graphql is missing" in result.output
    assert "Traceback" not in result.output

    (tmp_path / "released.graphql").write_text("type Query {", encoding="utf-8")
    result = _check_against(tmp_path / "released.graphql")
    assert result.exit_code == 1
    assert "the released schema is not valid SDL: Syntax Error" in result.output


def test_schema_release_refuses_a_bad_name_and_writes_nothing() -> None:
    files = (schema_evolution.RELEASED_SCHEMA_FILE, schema_evolution.CHANGELOG_FILE)
    before = [f.read_text(encoding="utf-8") for f in files]
    result = runner.invoke(app, ["schema", "release", "--version", "v2"])
    assert result.exit_code == 1
    assert "'v2' is not a release name" in result.output
    assert [f.read_text(encoding="utf-8") for f in files] == before


def test_migrate_is_idempotent(env: dict[str, str], engine: object) -> None:
    for _ in range(2):
        result = runner.invoke(app, ["migrate"])
        assert result.exit_code == 0, result.output
        assert f"database at revision {max(head_revisions())}" in result.output


def test_doctor_reports_services(env: dict[str, str], engine: object) -> None:
    result = runner.invoke(app, ["doctor"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for check in ("PostgreSQL", "pgvector", "migrations", "Redis", "tessdata", "GPU"):
        assert check in result.output


def test_doctor_fails_when_the_database_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGHTLINE_DATABASE_URL", f"postgresql://x@127.0.0.1:{free_port()}/x")
    monkeypatch.setenv("SIGHTLINE_REDIS_URL", REDIS_URL)
    result = runner.invoke(app, ["doctor"], terminal_width=200)
    assert result.exit_code == 1
    assert "FAIL" in result.output


def test_doctor_says_which_model_weights_fail_their_sha256(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "weights.onnx").write_bytes(b"not what the manifest names")
    manifest = {
        "name": "tampered",
        "version": "1",
        "task": "detection",
        "runtime": "onnx",
        "weights": "weights.onnx",
        "sha256": "0" * 64,
    }
    (tmp_path / "tampered.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("SIGHTLINE_VISION_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("SIGHTLINE_DATABASE_URL", f"postgresql://x@127.0.0.1:{free_port()}/x")
    monkeypatch.setenv("SIGHTLINE_REDIS_URL", REDIS_URL)
    result = runner.invoke(app, ["doctor"], terminal_width=400)
    lines = result.output.splitlines()
    [tampered] = [line for line in lines if "weights tampered" in line]
    assert "missing" in tampered  # not required: the other models serve
    assert "weights do not match" in tampered
    [ssd] = [line for line in lines if "weights ssd-mobilenet-v2-coco" in line]
    assert "sha256 matches" in ssd


def test_serve_fails_fast_on_an_unreachable_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGHTLINE_DATABASE_URL", f"postgresql://x:pw@127.0.0.1:{free_port()}/x")
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 1
    assert "cannot reach PostgreSQL" in result.output
    assert "Traceback" not in result.output


@pytest.mark.timeout(scaled(600))  # ready once every default model has warmed up, per worker
@pytest.mark.parametrize("workers", [1, 2])
def test_serve_on_embedded_defaults(tmp_path: Path, workers: int) -> None:
    """The README's run command: no configuration, embedded PostgreSQL, serves, stops cleanly;
    with several workers, the first admin is made once, before they start."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SIGHTLINE_")}
    environment["SIGHTLINE_DATA_DIR"] = str(tmp_path / "data")
    process = subprocess.Popen(
        dies_with_tests(
            [
                sys.executable,
                "-m",
                "backend",
                "serve",
                "--port",
                str(port),
                "--workers",
                str(workers),
            ]
        ),
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + scaled(480)  # a busy machine starts and warms up slowly
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        response = httpx.post(
            f"{base}/graphql", json={"query": "{ serverInfo { features { name enabled } } }"}
        )
        features = {
            f["name"]: f["enabled"] for f in response.json()["data"]["serverInfo"]["features"]
        }
        if workers == 1:  # workers are handed the URLs of the servers started for them
            assert features["database.embedded"] is True
            assert features["redis.embedded"] is False  # the Redis at 6379 answered
        # The first admin was made; its password is in a private file, never in the log.
        password_file = tmp_path / "data" / "initial-admin-password"
        assert oct(password_file.stat().st_mode & 0o777) == "0o600"
        password = password_file.read_text().strip()
        signed_in = httpx.post(
            f"{base}/oauth/token",
            data={
                "grant_type": "password",
                "tenant": "default",
                "username": "admin@sightline.local",
                "password": password,
            },
        )
        assert signed_in.status_code == 200, signed_in.text
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    # uvicorn re-raises the signal it handled once shutdown is complete.
    assert process.returncode in {0, -signal.SIGTERM}, output
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    messages = [line["message"] for line in lines]
    assert any(m.startswith("using embedded PostgreSQL at") for m in messages)
    assert any(m.startswith("stopped embedded postgresql") for m in messages)
    assert any(m.startswith("first admin created") for m in messages)
    # Where it serves: the --port given (it said the configured one, 8000).
    assert any(m.endswith(f"open http://127.0.0.1:{port}/") for m in messages), messages
    assert password not in output
    assert not (tmp_path / "data" / "postgres" / "postmaster.pid").exists()


def test_users_keys_and_signing_rotation(
    env: dict[str, str], engine: object, tmp_path: Path
) -> None:
    import uuid

    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    secret = tmp_path / "pw"
    secret.write_text("a long enough password\n")
    created = runner.invoke(
        app,
        [
            "users",
            "create",
            "--tenant",
            tenant,
            "--email",
            "ops@cli.example",
            "--role",
            "admin",
            "--password-file",
            str(secret),
        ],
    )
    assert created.exit_code == 0, created.output
    assert f"in tenant {tenant}" in created.output

    again = runner.invoke(
        app,
        [
            "users",
            "create",
            "--tenant",
            tenant,
            "--email",
            "OPS@cli.example",
            "--password-file",
            str(secret),
        ],
    )
    assert again.exit_code == 1
    assert "CONFLICT" in again.output

    key = runner.invoke(
        app,
        [
            "keys",
            "create",
            "--tenant",
            tenant,
            "--email",
            "ops@cli.example",
            "--name",
            "deploy",
            "--scope",
            "chat",
        ],
    )
    assert key.exit_code == 0, key.output
    assert key.stdout.strip().startswith("sl_")

    rotated = runner.invoke(app, ["keys", "rotate-signing"])
    assert rotated.exit_code == 0, rotated.output
    assert "now signing with" in rotated.output


def test_users_disable_and_enable(env: dict[str, str], engine: object, tmp_path: Path) -> None:
    import uuid

    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    secret = tmp_path / "pw"
    secret.write_text("a long enough password\n")
    for email, role in (("boss@cli.example", "owner"), ("dev@cli.example", "member")):
        options = ["--tenant", tenant, "--email", email, "--role", role]
        created = runner.invoke(app, ["users", "create", *options, "--password-file", str(secret)])
        assert created.exit_code == 0, created.output

    def users(command: str, email: str) -> Result:
        return runner.invoke(app, ["users", command, "--tenant", tenant, "--email", email])

    disabled = users("disable", "dev@cli.example")
    assert disabled.exit_code == 0, disabled.output
    assert f"disabled dev@cli.example in tenant {tenant}" in disabled.output
    enabled = users("enable", "dev@cli.example")
    assert enabled.exit_code == 0, enabled.output
    last_owner = users("disable", "boss@cli.example")
    assert (last_owner.exit_code, "CONFLICT" in last_owner.output) == (1, True)
    unknown = users("disable", "ghost@cli.example")
    assert (unknown.exit_code, "NOT_FOUND" in unknown.output) == (1, True)


def test_ingest_reports_each_document(
    env: dict[str, str], engine: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uuid

    monkeypatch.setenv("SIGHTLINE_COST_COMPUTE_SECOND_PRICES", '{"cpu": 1.0, "remote": 1.0}')
    tenant = f"kb-{uuid.uuid4().hex[:8]}"
    secret = tmp_path / "pw"
    secret.write_text("a long enough password\n")
    made = runner.invoke(
        app,
        [
            "users",
            "create",
            "--tenant",
            tenant,
            "--email",
            "kb@cli.example",
            "--password-file",
            str(secret),
        ],
    )
    assert made.exit_code == 0, made.output
    docs = tmp_path / "docs"
    (docs / "guide").mkdir(parents=True)
    (docs / "guide" / "intro.md").write_text("# Intro\n\nSightline ingests documents.\n")
    (docs / "handbook.md").write_text("# Handbook\n\nRefunds take fourteen days.\n")
    (docs / "photo.md").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))  # lies about its type
    (docs / "ignored.bin").write_bytes(b"\x00\x01")  # not a document extension: skipped
    result = runner.invoke(
        app,
        [
            "ingest",
            str(docs),
            "--tenant",
            tenant,
            "--email",
            "kb@cli.example",
            "--metadata",
            '{"team": "docs"}',
        ],
    )
    assert result.exit_code == 1, result.output  # one document failed
    assert "2 of 3 documents ingested" in result.output
    assert "UNSUPPORTED_MEDIA_TYPE" in result.output
    # A document's key is its file name, as an upload's (it was the absolute path: one file
    # ingested both ways became two documents); in a folder tree, its path from the folder.
    assert _sources(engine, tenant) == ["guide/intro.md", "handbook.md"]
    # each job's embeddings are recorded with their price (1 per second here), as the server's
    assert _embedding_cost(engine, tenant) > 0
    one_by_one = ["--tenant", tenant, "--email", "kb@cli.example", "--concurrency", "1"]
    again = runner.invoke(app, ["ingest", str(docs / "handbook.md"), *one_by_one])
    assert again.exit_code == 0, again.output
    assert "handbook.md: unchanged" in again.output
    assert _sources(engine, tenant) == ["guide/intro.md", "handbook.md"]
    none_at_a_time = runner.invoke(
        app, ["ingest", str(docs), "--tenant", tenant, "--email", "x@y.z", "--concurrency", "0"]
    )
    assert none_at_a_time.exit_code == 2, none_at_a_time.output  # refused before anything runs

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "handbook.md").write_text("# Another handbook\n")
    clash = runner.invoke(
        app,
        [
            "ingest",
            str(docs / "handbook.md"),
            str(tmp_path / "other" / "handbook.md"),
            "--tenant",
            tenant,
            "--email",
            "kb@cli.example",
        ],
    )
    assert clash.exit_code == 1
    assert "2 documents would have the source 'handbook.md'" in clash.output


def _as_superuser(engine: Any, sql: str, tenant: str) -> list[Any]:
    """The rows of `sql` (bound to the tenant's slug), read by the test's superuser (no
    row-level security)."""

    async def read() -> list[Any]:
        database = create_async_engine(engine.url)
        try:
            async with database.connect() as connection:
                return list(await connection.execute(text(sql), {"slug": tenant}))
        finally:
            await database.dispose()

    return asyncio.run(read())


def _embedding_cost(engine: Any, tenant: str) -> float:
    """What the tenant's embedding usage records cost."""
    [(total,)] = _as_superuser(
        engine,
        "SELECT coalesce(sum(u.cost), 0) FROM usage_records u JOIN tenants t "
        "ON t.id = u.tenant_id WHERE t.slug = :slug AND u.kind = 'embedding'",
        tenant,
    )
    return float(total)


def _sources(engine: Any, tenant: str) -> list[str]:
    """The tenant's document keys."""
    rows = _as_superuser(
        engine,
        "SELECT d.source FROM documents d JOIN tenants t ON t.id = d.tenant_id "
        "WHERE t.slug = :slug ORDER BY d.source",
        tenant,
    )
    return [row[0] for row in rows]


async def test_users_reset_password(env: dict[str, str], engine: object, tmp_path: Path) -> None:
    """Set from stdin (never argv); the old password, sessions and tokens stop working."""
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    secret = tmp_path / "pw"
    secret.write_text("the first long password\n")
    options = ["--tenant", tenant, "--email", "pat@cli.example"]

    def invoke(*args: str, stdin: str | None = None) -> Result:
        return runner.invoke(app, list(args), input=stdin)

    created = await asyncio.to_thread(
        invoke, "users", "create", *options, "--password-file", str(secret)
    )
    assert created.exit_code == 0, created.output
    async with cli._auth(cli._settings()) as auth:
        before = await auth.password_grant(
            tenant, "pat@cli.example", "the first long password", None, None
        )
        assert before.refresh_token

    reset = await asyncio.to_thread(
        invoke, "users", "reset-password", *options, stdin="the second long password\n"
    )
    assert reset.exit_code == 0, reset.output
    assert f"password of pat@cli.example in tenant {tenant} reset" in reset.output
    assert "the second long password" not in reset.output

    async with cli._auth(cli._settings()) as auth:
        with pytest.raises(AppError):  # the old password
            await auth.password_grant(
                tenant, "pat@cli.example", "the first long password", None, None
            )
        with pytest.raises(AppError):  # the session it opened, both its tokens
            await auth.refresh_grant(before.refresh_token, None, None)
        with pytest.raises(AppError):
            await auth.authenticate(f"Bearer {before.access_token}")
        after = await auth.password_grant(
            tenant, "pat@cli.example", "the second long password", None, None
        )
        assert (await auth.authenticate(f"Bearer {after.access_token}")).tenant_id

    short = await asyncio.to_thread(invoke, "users", "reset-password", *options, stdin="short\n")
    assert short.exit_code == 1
    assert "BAD_USER_INPUT" in short.output
    on_argv = await asyncio.to_thread(
        invoke, "users", "reset-password", *options, "--password", "the third long password"
    )
    assert on_argv.exit_code == 2  # no such option: a password never goes on the command line
    unknown = await asyncio.to_thread(
        invoke,
        "users",
        "reset-password",
        "--tenant",
        tenant,
        "--email",
        "nobody@cli.example",
        stdin="the third long password\n",
    )
    assert unknown.exit_code == 1
    assert "NOT_FOUND" in unknown.output


def test_serve_on_a_taken_port_fails_at_once(tmp_path: Path) -> None:
    """It did the whole start (initdb, migrations, first admin), logged "ready ... open
    http://127.0.0.1:PORT/" (someone else's server), then died of Errno 98."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SIGHTLINE_")}
    environment["SIGHTLINE_DATA_DIR"] = str(tmp_path / "data")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        finished = subprocess.run(
            [sys.executable, "-m", "backend", "serve", "--port", str(port)],
            env=environment,
            check=False,
            capture_output=True,
            text=True,
            timeout=scaled(60),
        )
    assert finished.returncode == 1, finished
    assert finished.stdout == ""
    [line] = finished.stderr.splitlines()
    assert line.startswith(f"error: cannot listen on 127.0.0.1:{port}: Address already in use")
    assert not (tmp_path / "data").exists()  # nothing was started or created


def test_doctor_on_a_fresh_data_dir_says_serve_migrates_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It exited 1 with "migrations FAIL at nothing, code wants 0007" and no hint. `serve`
    migrates the embedded database at start, so a fresh data dir is no fault."""
    for name in [n for n in os.environ if n.startswith("SIGHTLINE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SIGHTLINE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SIGHTLINE_REDIS_URL", REDIS_URL)
    monkeypatch.setattr(cli.out, "_width", 300)  # each check on one line of the table
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    [row] = [line for line in result.output.splitlines() if "migrations" in line]
    assert "ok" in row
    assert f"at nothing, code wants {max(head_revisions())}" in row
    assert "`sightline serve` applies them at start" in row


async def test_doctor_fails_on_an_unmigrated_database_nothing_will_migrate(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A configured database is not migrated by `serve` (unless asked): a fault, with the fix."""
    name = f"fresh_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(engine.url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            await connection.execute(text(f'CREATE DATABASE "{name}"'))
        url = engine.url.set(database=name).render_as_string(hide_password=False)
        monkeypatch.setenv("SIGHTLINE_DATABASE_URL", url)
        monkeypatch.setenv("SIGHTLINE_REDIS_URL", REDIS_URL)
        monkeypatch.setattr(cli.out, "_width", 300)
        result = await asyncio.to_thread(runner.invoke, app, ["doctor"])
        assert result.exit_code == 1, result.output
        [row] = [line for line in result.output.splitlines() if "migrations" in line]
        assert "FAIL" in row
        assert "run `sightline migrate`" in row
    finally:
        async with admin.connect() as connection:
            await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


def _walk(command: Any, path: list[str]) -> Iterator[list[str]]:
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _walk(sub, [*path, name])


def test_help_shows_no_type_beside_flags() -> None:
    """Every option showed `<bool>` beside it, `--help` included, though flags take no value."""
    paths = list(_walk(typer.main.get_command(app), []))
    assert ["users", "reset-password"] in paths
    for path in paths:
        result = runner.invoke(app, [*path, "--help"], terminal_width=200)
        assert result.exit_code == 0, (path, result.output)
        assert "--help" in result.output
        assert "<bool>" not in result.output, (path, result.output)
    flags = runner.invoke(app, ["privacy", "erase-user", "--help"], terminal_width=200)
    assert "--yes" in flags.output
    assert "<str>" in flags.output  # options that take a value still say what they take
