"""`sightline models ...`: the registry as an operator runs it from a shell (on a database of
its own: what the CLI commits outlives the test). Plain `sightline models` stays the README's
table (tests/test_readme.py)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from typer.testing import CliRunner

from backend.cli import app
from backend.config import LifecycleSettings
from backend.core.migrations import upgrade_to_head
from backend.core.redis import KeySpace
from backend.lifecycle._series import Series
from backend.lifecycle.stats import ServingStats
from tests.conftest import REDIS_URL, empty_database
from tests.lifecycle.conftest import weights_file

runner = CliRunner()


@pytest.fixture(scope="module")
async def own_database(engine: AsyncEngine) -> AsyncIterator[str]:
    async with empty_database(engine) as fresh:
        await upgrade_to_head(fresh)
        yield fresh.url.render_as_string(hide_password=False)


@pytest.fixture
def env(own_database: str, redis: Redis, key_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGHTLINE_DATABASE_URL", own_database)
    monkeypatch.setenv("SIGHTLINE_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("SIGHTLINE_REDIS_KEY_PREFIX", key_prefix)  # cleaned up by `redis`


async def invoke(*args: str) -> tuple[int, str]:
    """The command in a thread of its own (it runs its own event loop)."""
    result = await asyncio.to_thread(runner.invoke, app, list(args))
    return result.exit_code, result.output


async def test_register_split_promote_rollback_pin_retire(
    env: None, tmp_path: Path, redis: Redis, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps({"provider": "openai", "base_url": "http://llm.example/v1"}))
    for version in ("1", "2"):
        code, out = await invoke(
            "models", "register", "writer", version, "--spec", str(chat), "--kind", "chat"
        )
        assert code == 0, out
        assert f"registered writer@{version}: ready" in out
    code, out = await invoke("models", "register", "writer", "2", "--spec", str(chat))
    assert code == 1
    assert "MODEL_VERSION_EXISTS" in out

    code, out = await invoke("models", "policy", "writer", "--arm", "1=90", "--arm", "2=10")
    assert code == 0, out
    assert "writer revision 1: 1 90%, 2 10% (sticky: user)" in out
    code, out = await invoke("models", "policy", "writer", "--arm", "1=90")
    assert code == 1
    assert "INVALID_TRAFFIC_POLICY" in out
    code, out = await invoke("models", "policy", "writer", "--arm", "ninety")
    assert code == 1
    assert "VERSION=WEIGHT" in out
    code, out = await invoke("models", "policy", "writer")
    assert "writer revision 1" in out  # unchanged by the refusals

    code, out = await invoke("models", "promote", "writer", "2")
    assert code == 0, out
    assert "revision 2: 2 100%" in out
    code, out = await invoke("models", "rollback", "writer", "--reason", "drill")
    assert code == 0, out
    assert "revision 3: 1 90%, 2 10%" in out
    code, out = await invoke("models", "list")
    assert code == 0, out
    assert "writer" in out

    # what the servers counted (here: recorded as a replica would, flushed to the same Redis)
    series = Series(redis, KeySpace(key_prefix), LifecycleSettings())
    stats = ServingStats(series)
    for i in range(10):
        stats.record("writer", "1", ok=i != 0, latency_s=0.1, tokens=5, cost=0.01)
    stats.record("writer", "2", ok=True, latency_s=0.3, tokens=7, cost=0.02)
    await series.flush()
    monkeypatch.setenv("COLUMNS", "200")  # the whole table
    code, out = await invoke("models", "compare", "writer", "--window", "600")
    assert code == 0, out
    rows = [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in out.splitlines()
        if line.startswith(("│ 1 ", "│ 2 "))
    ]
    assert [row[:5] for row in rows] == [  # version, role, weight, requests, errors
        ["1", "live", "90%", "10", "1 (10.0%)"],
        ["2", "candidate", "10%", "1", "0 (0.0%)"],
    ]
    code, out = await invoke("models", "compare", "nobody")
    assert code == 1
    assert "NOT_FOUND" in out

    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    password = tmp_path / "pw"
    password.write_text("a long enough password\n")
    code, out = await invoke(
        "users", "create", "--tenant", tenant, "--email", f"boss@{tenant}.example",
        "--role", "owner", "--password-file", str(password),
    )  # fmt: skip
    assert code == 0, out
    code, out = await invoke("models", "pin", "writer", "2", "--tenant", tenant)
    assert code == 0, out
    code, out = await invoke("models", "versions", "writer")
    assert code == 0, out
    assert "-> 2" in out
    code, out = await invoke("models", "retire", "writer", "2")
    assert code == 1
    assert "MODEL_VERSION_IN_USE" in out
    code, out = await invoke("models", "pin", "writer", "--tenant", tenant, "--unpin")
    assert code == 0, out
    assert "unpinned writer" in out
    code, out = await invoke("models", "promote", "writer", "1")
    assert code == 0, out
    code, out = await invoke("models", "retire", "writer", "2")
    assert code == 0, out
    assert "writer@2: retired" in out


async def test_a_manifest_is_checked_from_its_own_folder(env: None, tmp_path: Path) -> None:
    weights, digest = weights_file(tmp_path, b"cli weights")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(
        json.dumps(
            {"task": "classification", "runtime": "onnx", "weights": weights.name, "sha256": digest}
        )
    )
    code, out = await invoke(
        "models", "register", "tagger", "1", "--spec", str(manifest), "--kind", "vision",
        "--task", "classification",
    )  # fmt: skip
    assert code == 0, out
    assert "registered tagger@1: loading" in out
    code, out = await invoke(
        "models", "register", "tagger", "2", "--spec", str(manifest), "--sha256", "0" * 64
    )
    assert code == 1
    assert "CHECKSUM_MISMATCH" in out

    # a registered version's spec, printed to be registered again (as another version)
    code, out = await invoke("models", "spec", "tagger", "1")
    assert code == 0, out
    printed = json.loads(out)
    assert not {"name", "version"} & set(printed)
    assert printed["runtime"] == "onnx"
    assert Path(printed["weights"]) == weights.resolve()  # from the manifest's folder
    again = tmp_path / "again.json"
    again.write_text(out)
    code, out = await invoke("models", "register", "tagger", "3", "--spec", str(again))
    assert code == 0, out
    assert "registered tagger@3: loading" in out
    code, out = await invoke("models", "spec", "tagger", "9")
    assert code == 1
    assert "NOT_FOUND" in out


async def test_an_embedding_models_versions_show_the_knowledge_bases_reembedding(
    env: None, own_database: str, tmp_path: Path
) -> None:
    spec = tmp_path / "embedder.json"
    spec.write_text(json.dumps({"provider": "openai", "base_url": "http://embed.example/v1"}))
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps({"provider": "local", "dimensions": 768}))
    code, out = await invoke(
        "models", "register", "vectors", "1", "--spec", str(spec), "--kind", "embedding"
    )
    assert code == 0, out
    code, out = await invoke("models", "register", "vectors", "2", "--spec", str(wide))
    assert code != 0
    assert "384" in out  # the knowledge base's vectors have one size
    code, out = await invoke("models", "versions", "vectors")
    assert code == 0, out
    assert "knowledge base: not its embedder" in out
    engine = create_async_engine(own_database)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO knowledge_embeddings (model, serving_slot, serving_version, "
                    "slot0, slot1, status, target_version, done, total) VALUES ('vectors', 0, "
                    "'1', 'vectors@1', 'vectors@2', 'running', '2', 2, 5)"
                )
            )
        code, out = await invoke("models", "versions", "vectors")
        assert code == 0, out
        assert "search uses 1; re-embedding to 2: running, 2 of 5 chunks" in out
    finally:
        async with engine.begin() as conn:
            await conn.execute(text("DELETE FROM knowledge_embeddings WHERE model = 'vectors'"))
        await engine.dispose()


async def test_a_refitted_head_file_is_registered_and_shadowed_from_the_shell(
    env: None, tmp_path: Path
) -> None:
    """The file `bench/guardrails.py --fit-head` writes is a guardrail version's spec as it
    stands; a file that is not a head is refused with the fields at fault."""
    from backend.guardrails import head

    # the registry knows the knowledge base's embedding model (a server seeds it at start):
    # the head reads its vectors
    local = tmp_path / "local.json"
    local.write_text(json.dumps({"provider": "local"}))
    code, out = await invoke(
        "models", "register", "all-minilm-l6-v2", "0.1.0", "--spec", str(local),
        "--kind", "embedding",
    )  # fmt: skip
    assert code == 0 or "MODEL_VERSION_EXISTS" in out, out
    code, out = await invoke(
        "models", "register", "attack-head", "refit-1", "--spec", str(head.PATH),
        "--kind", "guardrail", "--notes", "refitted",
    )  # fmt: skip
    assert code == 0, out
    assert "registered attack-head@refit-1: ready" in out
    broken = tmp_path / "head.json"
    broken.write_text(json.dumps({**head.AttackHead.load().spec(), "weights": [0.5] * 8}))
    code, out = await invoke("models", "register", "attack-head", "bad", "--spec", str(broken))
    assert code == 1
    assert "INVALID_MODEL_SPEC" in out
    code, out = await invoke("models", "register", "x", "1", "--spec", str(broken), "--kind", "y")
    assert code != 0
    assert "guardrail" in out  # the kinds are listed
    code, out = await invoke(
        "models", "policy", "attack-head", "--arm", "refit-1=100", "--shadow", "refit-1",
    )  # fmt: skip
    assert code == 1  # the live version cannot be its own shadow
    assert "INVALID_TRAFFIC_POLICY" in out
    code, out = await invoke("models", "versions", "attack-head")
    assert code == 0, out
    assert "attack-head (guardrail, injection)" in out
