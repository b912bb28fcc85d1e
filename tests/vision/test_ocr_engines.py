"""The second OCR engine: RapidOCR (the packaged PP-OCRv6 models) as a manifest model of a real
inference pool, read through the vision service: the text of a rendered page with lines and
words in the page's pixels, an unknown engine refused naming the engines there are, and a model
file that fails its sha256 never served."""

from __future__ import annotations

import asyncio
import dataclasses
import io
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from redis.asyncio import Redis

from backend.core.db import Database
from backend.errors import ValidationFailed
from backend.inference.client import ModelStatus, ModelUnavailable
from backend.inference.manifest import builtin_manifests
from backend.inference.pool import InferencePool
from backend.vision.service import VisionService, VisionTask
from tests.knowledge.test_service import database, new_principal
from tests.vision.test_recovery import stop, vision

__all__ = ["database"]  # fixture

RAPIDOCR = "rapidocr"
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def page(lines: list[str], size: int = 28, width: int = 760) -> np.ndarray:
    font = ImageFont.truetype(FONT, size)
    image = Image.new("RGB", (width, 40 + len(lines) * size * 2), "white")
    draw = ImageDraw.Draw(image)
    for index, line in enumerate(lines):
        draw.text((24, 20 + index * size * 2), line, font=font, fill="black")
    return np.asarray(image)


def manifest() -> Any:
    return {m.name: m for m in builtin_manifests()}[RAPIDOCR]


@pytest.fixture
async def service(database: Database, redis: Redis, key_prefix: str) -> AsyncIterator[Any]:
    # two threads, as the server runs it on 2 cores: a page's lines are read side by side
    pool = InferencePool([manifest()], threads=2)
    await pool.start()
    await pool.wait_ready(timeout_s=300)
    served = vision(database, redis, key_prefix, pool)  # type: ignore[arg-type]
    try:
        yield served
    finally:
        await stop(served)
        await pool.close()


async def test_rapidocr_reads_a_rendered_page_with_lines_and_words(
    service: VisionService,
) -> None:
    invoice = page(["Invoice 4711 is due on Friday", "Total: 129.50 EUR"])
    letter = page(["Dear Ada, the parcel left Berlin today."], size=22)
    # at once: both go to the model's batcher
    read, other = await asyncio.gather(
        service.read(invoice, RAPIDOCR), service.read(letter, RAPIDOCR)
    )
    assert read["text"].splitlines() == ["Invoice 4711 is due on Friday", "Total: 129.50 EUR"]
    assert "parcel left Berlin" in other["text"]
    assert [line["text"] for line in read["lines"]] == read["text"].splitlines()
    words = [w["text"] for w in read["words"]]
    assert words[:3] == ["Invoice", "4711", "is"]
    assert "129.50" in words
    height, width = invoice.shape[:2]
    for item in (*read["lines"], *read["words"]):
        assert 0 < item["confidence"] <= 1
        box = item["box"]
        assert 0 <= box["x"] < box["x"] + box["width"] <= width + 1
        assert 0 <= box["y"] < box["y"] + box["height"] <= height + 1
    first, second = read["lines"]
    assert first["box"]["y"] + first["box"]["height"] <= second["box"]["y"] + 2  # top to bottom
    invoice_word = read["words"][0]["box"]  # "Invoice" starts the first line
    assert abs(invoice_word["x"] - first["box"]["x"]) < 12
    assert invoice_word["width"] < first["box"]["width"] / 2
    assert (await service.read(np.full((80, 200, 3), 255, np.uint8), RAPIDOCR))["text"] == ""


async def test_a_large_image_is_read_with_boxes_in_its_own_pixels(
    service: VisionService,
) -> None:
    small = page(["Sightline reads large scans too"], size=40, width=900)
    large = np.asarray(Image.fromarray(small).resize((small.shape[1] * 3, small.shape[0] * 3)))
    read = await service.read(large, RAPIDOCR)  # its long side is cut to 2000 px for the model
    assert "Sightline reads large scans too" in read["text"]
    [line] = read["lines"]
    assert line["box"]["width"] > 1500  # scaled back to the 2700 px wide image


async def test_an_unknown_ocr_engine_is_refused_naming_the_engines(
    service: VisionService, database: Database
) -> None:
    principal = await new_principal(database)
    buffer = io.BytesIO()
    Image.fromarray(page(["hello"])).save(buffer, "PNG")
    with pytest.raises(ValidationFailed) as refused:
        await service.analyze(principal, buffer.getvalue(), [VisionTask.OCR], ocr_engine="easyocr")
    assert refused.value.code == "BAD_USER_INPUT"
    assert "tesseract, rapidocr" in refused.value.message
    assert refused.value.details["field"] == "ocrEngine"


async def test_a_rapidocr_file_that_fails_its_sha256_is_not_served() -> None:
    packaged = manifest()
    files = {role: dict(entry) for role, entry in packaged.files.items()}
    files["rec"]["sha256"] = "0" * 64
    tampered = dataclasses.replace(packaged, name="rapidocr-tampered", files=files)
    pool = InferencePool([tampered])
    await pool.start()
    try:
        await pool.wait_ready(timeout_s=300)
        state = pool.status()["rapidocr-tampered"]
        assert state.status is ModelStatus.FAILED
        assert "rec do not match their sha256" in (state.error or "")
        with pytest.raises(ModelUnavailable, match="sha256"):
            await pool.infer("rapidocr-tampered", [page(["x"])])
    finally:
        await pool.close()
