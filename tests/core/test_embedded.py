"""Embedded PostgreSQL and Valkey: start, persist across restarts, stop; Redis detection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from backend.core.embedded import EmbeddedPostgres, EmbeddedValkey, local_redis_answers
from tests.conftest import free_port, scaled


async def test_embedded_postgres_keeps_data_across_restarts(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pg")
    url = server.start()
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE kept (v int)"))
            await conn.execute(text("INSERT INTO kept VALUES (42)"))
    finally:
        await engine.dispose()
        server.stop()

    url = server.start()
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT v FROM kept")) == 42
    finally:
        await engine.dispose()
        server.stop()


async def test_embedded_valkey_answers_and_stops(tmp_path: Path) -> None:
    server = EmbeddedValkey(tmp_path / "valkey")
    url = server.start()
    client = Redis.from_url(url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()
        server.stop()
    assert not local_redis_answers("127.0.0.1", int(url.rsplit(":", 1)[1]))


def test_redis_detection() -> None:
    assert local_redis_answers()  # the machine's Redis at 6379 (tests require it)
    assert not local_redis_answers("127.0.0.1", free_port())


@pytest.mark.parametrize("port", [1])
def test_detection_of_a_closed_privileged_port(port: int) -> None:
    assert not local_redis_answers("127.0.0.1", port, timeout_s=0.2)


def test_a_killed_process_leaves_no_embedded_postgres_running(tmp_path: Path) -> None:
    """SIGKILL runs no shutdown code: the server's caretaker stops PostgreSQL instead. A later
    start adopts a server left running anyway (its dead handle is dropped), and stops it."""
    data = tmp_path / "pg"
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(data)], stdout=subprocess.PIPE, text=True
    )
    assert owner.stdout is not None
    assert owner.stdout.readline().startswith("postgresql")  # started, and serving
    postmaster = _postmaster(data)
    assert postmaster.is_running()
    owner.kill()  # and not reaped yet: a zombie, as under a shell that has not waited
    postmaster.wait(timeout=scaled(60))  # stopped by the caretaker
    owner.wait()

    # A handle left by a process that shared the server and was killed (its caretaker saw
    # this one alive): the last live handle stops it.
    server = EmbeddedPostgres(data)
    server.start()
    (data / ".handle_pids.json").write_text(json.dumps([_dead_pid(), os.getpid()]))
    postmaster = _postmaster(data)
    server.stop()
    postmaster.wait(timeout=scaled(60))


def test_a_killed_process_leaves_no_embedded_valkey_running(tmp_path: Path) -> None:
    """SIGKILL runs no shutdown code: the Valkey server's caretaker stops it instead."""
    owner = subprocess.Popen(
        [sys.executable, "-c", _VALKEY_OWNER, str(tmp_path / "valkey")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    line = owner.stdout.readline().split()
    assert line, "the owner printed nothing"
    assert line[0].startswith("redis://"), line  # started, and serving
    valkey = psutil.Process(int(line[1]))
    assert valkey.is_running()
    owner.kill()
    valkey.wait(timeout=scaled(60))  # stopped by the caretaker
    owner.wait()
    assert not local_redis_answers("127.0.0.1", int(line[0].rsplit(":", 1)[1].split("/")[0]))


_VALKEY_OWNER = """
import sys, time
from pathlib import Path
from backend.core.embedded import EmbeddedValkey
server = EmbeddedValkey(Path(sys.argv[1]))
url = server.start()
print(url, server._server._process.pid, flush=True)
time.sleep(3600)
"""


_OWNER = """
import sys, time
from pathlib import Path
from backend.core.embedded import EmbeddedPostgres
print(EmbeddedPostgres(Path(sys.argv[1])).start(), flush=True)
time.sleep(3600)
"""


def _postmaster(data: Path) -> psutil.Process:
    return psutil.Process(int((data / "postmaster.pid").read_text().split()[0]))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid
