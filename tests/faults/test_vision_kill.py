"""A server process killed with SIGKILL in the middle of a vision job (OCR of a full page, which
takes seconds): another replica runs the job again from the image stored with it, its row and
its stream end in agreement, the client watching it through the other replica gets its end, and
no compute stays held."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw, ImageFont
from redis.asyncio import Redis
from sqlalchemy import select

from backend.core.db import Database
from backend.core.models import VisionJob, VisionUpload
from backend.core.redis import KeySpace
from backend.realtime.eventlog import RunEventLog
from tests.faults.conftest import KEY_PREFIX, Watcher, events_of, sign_in, until
from tests.faults.servers import PATIENCE_S, AppServer, serving

pytestmark = pytest.mark.timeout(900)

ANALYZE = """mutation($image: Upload!) {
  analyzeImage(image: $image, tasks: [OCR]) { id status } }"""

EVENTS = """subscription($id: ID!) { visionJobEvents(id: $id) {
  __typename
  ... on VisionJobResumed { tasks }
  ... on VisionTaskCompleted { task result }
  ... on VisionJobFailed { code message } } }"""

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


def page() -> bytes:
    """A full page of small print: its OCR takes seconds, long enough to kill the server in
    the middle of it."""
    font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", 20)
    image = Image.new("RGB", (1600, 2000), "white")
    draw = ImageDraw.Draw(image)
    for line, y in enumerate(range(10, 1970, 30)):
        words = " ".join(f"{WORDS[(line + i) % 8]}{line}" for i in range(20))
        draw.text((10, y), words, font=font, fill="black")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


async def analyze(server: AppServer, token: str, image: bytes) -> str:
    operations = {"query": ANALYZE, "variables": {"image": None}}
    async with httpx.AsyncClient(base_url=server.http_url, timeout=PATIENCE_S) as http:
        response = await http.post(
            "/graphql",
            data={
                "operations": json.dumps(operations),
                "map": json.dumps({"0": ["variables.image"]}),
            },
            files={"0": ("page.png", image, "image/png")},
            headers={"authorization": f"Bearer {token}"},
        )
    body = response.json()
    assert "errors" not in body, body
    return str(body["data"]["analyzeImage"]["id"])


async def job_row(database: Database, account: dict[str, Any], job_id: str) -> VisionJob:
    async with database.session(account["tenant_id"]) as session:
        row = await session.get(VisionJob, uuid.UUID(job_id))
        assert row is not None
        return row


async def test_another_replica_finishes_a_vision_job_from_its_stored_image(
    tmp_path: Path,
    environment: dict[str, str],
    redis: Redis,
    account: dict[str, Any],
    database: Database,
) -> None:
    vision_on = {
        **environment,
        "SIGHTLINE_VISION_ENABLED": "true",
        "SIGHTLINE_VISION_JOB_LEASE_S": "1",
        "SIGHTLINE_VISION_JOB_LOST_GRACE_S": "3",
    }
    doomed = AppServer(tmp_path / "doomed", vision_on)
    survivor = AppServer(tmp_path / "survivor", vision_on)
    async with serving(doomed, survivor):
        token = await sign_in(doomed.http_url, account)
        job_id = await analyze(doomed, token, page())
        # a client of the other replica
        watcher = Watcher(survivor.ws_url, token, EVENTS, {"id": job_id}, "visionJobEvents")

        async def reading() -> bool:
            return (await job_row(database, account, job_id)).status == "running"

        await until(reading, "the page is being read")
        await doomed.kill()
        row = await job_row(database, account, job_id)
        assert row.status == "running", "the job ended before the kill: make it slower"

        # The subscriber is not left hanging: the job is run again and ends.
        await watcher.ended()
        seen = watcher.events
        kinds = [e["__typename"] for e in seen]
        assert kinds[0] == "VisionJobQueued", kinds
        assert kinds[-1] == "VisionJobCompleted", seen[-3:]
        assert kinds.count("VisionJobResumed") == 1
        [read] = [e for e in seen if e["__typename"] == "VisionTaskCompleted"]
        assert "charlie" in read["result"]["text"]  # the page was read

    # Row and stream agree; the image is gone with the job's end; nothing stays going.
    row = await job_row(database, account, job_id)
    assert (row.status, row.error_code) == ("completed", None)
    assert row.results["ocr"]["result"] == read["result"]
    async with database.session(account["tenant_id"]) as session:
        assert await session.get(VisionUpload, row.id) is None
        going = await session.scalars(
            select(VisionJob.id).where(VisionJob.status.in_(["queued", "running"]))
        )
        assert list(going) == []
    keys = KeySpace(KEY_PREFIX).child("vision")
    log = RunEventLog(redis, keys)
    try:
        assert [e.type for e in await events_of(log, job_id)] == kinds
    finally:
        await log.close()
    assert await redis.ttl(keys.child("run")(f"{{{job_id}}}", "events")) > 0  # it expires
    # The compute hold is settled once: nothing stays held.
    held = [k async for k in redis.scan_iter(match=f"{KEY_PREFIX}budget:*compute_seconds*:held")]
    assert held, "no compute was ever held"
    assert [float(v or 0) for v in await redis.mget(held)] == [0.0] * len(held)
