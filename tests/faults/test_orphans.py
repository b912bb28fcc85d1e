"""A server killed with SIGKILL leaves no process behind: not its inference worker, not its
embedding worker, not their resource tracker, and with `--workers N` not the workers of the
supervisor that was killed (each would hold hundreds of megabytes for good); nor any of the
inference workers' shared-memory batch slabs (the resource tracker unlinks them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil
import pytest
from redis.asyncio import Redis

from backend.inference._transport import slab_prefix
from tests.faults.conftest import events_of, ingest, job_log, sign_in, until
from tests.faults.servers import AppServer, serving

pytestmark = pytest.mark.timeout(900)


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def batch_slabs(owners: list[psutil.Process]) -> set[Path]:
    """The inference workers' shared-memory slabs that these processes made."""
    return {p for o in owners for p in Path("/dev/shm").glob(f"{slab_prefix(o.pid)}*")}


@pytest.mark.parametrize(
    ("workers", "vision"), [(1, True), (2, False)], ids=["one-process-vision", "two-workers"]
)
async def test_a_killed_server_leaves_no_process_behind(
    tmp_path: Path,
    environment: dict[str, str],
    redis: Redis,
    account: dict[str, Any],
    workers: int,
    vision: bool,
) -> None:
    environment = {
        **environment,
        "SIGHTLINE_VISION_ENABLED": str(vision).lower(),  # the inference pool's worker process
    }
    del environment["SIGHTLINE_KNOWLEDGE_EMBEDDING_BASE_URL"]  # the local embedding worker
    del environment["SIGHTLINE_KNOWLEDGE_EMBEDDING_MODEL"]
    server = AppServer(tmp_path / "server", environment, workers=workers)
    async with serving(server):
        token = await sign_in(server.http_url, account)
        job_id = await ingest(server.http_url, token, "Orphans are processes.", "orphans.txt")
        events = await events_of(job_log(redis), job_id)  # the embedding worker did the job
        assert events[-1].type == "IngestionCompleted", [(e.type, e.data) for e in events]
        children = server.descendants()
        names = [" ".join(c.cmdline()) for c in children]
        assert any("spawn_main" in n for n in names), names  # the workers are there
        slabs = batch_slabs([psutil.Process(), *psutil.Process().children(recursive=True)])
        if vision:
            assert slabs, "the inference worker's batch slab is there"
        await server.kill()
        await until(lambda: not any(alive(c) for c in children), "every child to end")
        await until(lambda: not any(p.exists() for p in slabs), "the slabs to be unlinked")
