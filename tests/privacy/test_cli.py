"""`sightline privacy ...`: the policy, exports, erasures and purges as an operator runs them."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from redis.asyncio import Redis
from typer.testing import CliRunner

from backend.cli import app
from tests.conftest import REDIS_URL

runner = CliRunner()


@pytest.fixture
def env(
    database_url: str,
    engine: object,
    redis: Redis,
    key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SIGHTLINE_DATABASE_URL", database_url)
    monkeypatch.setenv("SIGHTLINE_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("SIGHTLINE_REDIS_KEY_PREFIX", key_prefix)  # cleaned up by `redis`


def invoke(*args: str, stdin: str | None = None) -> tuple[int, str]:
    result = runner.invoke(app, list(args), input=stdin)
    return result.exit_code, result.output


def test_policy_export_erase_and_purge(env: None, tmp_path: Path) -> None:
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    password = tmp_path / "pw"
    password.write_text("a long enough password\n")
    for email, role in (("boss@cli.example", "owner"), ("ada@cli.example", "member")):
        code, out = invoke(
            "users", "create", "--tenant", tenant, "--email", email, "--role", role,
            "--password-file", str(password),
        )  # fmt: skip
        assert code == 0, out

    code, out = invoke("privacy", "policy", "--tenant", tenant)
    assert code == 0, out
    assert json.loads(out)["retention"]["messages_days"] is None
    code, out = invoke(
        "privacy", "policy", "--tenant", tenant, "--messages-days", "30",
        "--audit-days", "forever", "--store-messages-redacted",
    )  # fmt: skip
    assert code == 0, out
    policy = json.loads(out)
    assert policy["retention"]["messages_days"] == 30
    assert policy["retention"]["audit_days"] is None
    assert policy["store_messages_redacted"] is True
    code, out = invoke("privacy", "policy", "--tenant", tenant, "--messages-days", "soon")
    assert code == 1
    assert "number of days or `forever`" in out
    code, out = invoke("privacy", "policy", "--tenant", tenant, "--vision-days", "0")
    assert code == 1
    assert "BAD_USER_INPUT" in out
    code, out = invoke("privacy", "policy", "--tenant", "no-such-tenant")
    assert code == 1
    assert "no tenant" in out

    archive = tmp_path / "ada.json"
    code, out = invoke(
        "privacy", "export", "--tenant", tenant, "--email", "ada@cli.example",
        "--output", str(archive),
    )  # fmt: skip
    assert code == 0, out
    assert json.loads(archive.read_text())["user"]["email"] == "ada@cli.example"

    code, out = invoke(
        "privacy", "erase-user", "--tenant", tenant, "--email", "ada@cli.example", stdin="n\n"
    )
    assert code == 1  # not confirmed: nothing erased
    code, out = invoke(
        "privacy", "erase-user", "--tenant", tenant, "--email", "ada@cli.example", "--yes"
    )
    assert code == 0, out
    assert out.startswith("completed: erased-user-")
    assert "1 users" in out
    code, out = invoke(
        "privacy", "erase-user", "--tenant", tenant, "--email", "ada@cli.example", "--yes"
    )
    assert code == 1
    assert "no user" in out
    code, out = invoke(
        "privacy", "erase-user", "--tenant", tenant, "--email", "boss@cli.example", "--yes"
    )
    assert code == 1
    assert "ERASURE_REFUSED" in out

    code, out = invoke("privacy", "purge", "--tenant", tenant)
    assert code == 0, out
    assert out.startswith("purged:")

    code, out = invoke("privacy", "erase-tenant", "--tenant", tenant, "--yes")
    assert code == 0, out
    assert out.startswith("completed: erased-tenant-")
    code, out = invoke("privacy", "policy", "--tenant", tenant)
    assert code == 1
    assert "no tenant" in out
