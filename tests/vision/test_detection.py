"""Object detection through the service and a real inference pool: the packaged SSD-MobileNetV2
(COCO) finds what scikit-image's photos show, the face cascade scores its faces, the request's
limits apply, and an unknown detector is refused naming the ones there are."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from PIL import Image
from redis.asyncio import Redis
from skimage import data as photos

from backend.core.db import Database
from backend.errors import ValidationFailed
from backend.inference.manifest import builtin_manifests
from backend.inference.pool import InferencePool
from backend.vision.service import VisionService, VisionTask
from tests.knowledge.test_service import database, new_principal
from tests.vision.test_recovery import stop, vision

__all__ = ["database"]  # fixture

SSD = "ssd-mobilenet-v2-coco"
FACES = "haar-frontalface"

# photo -> what it shows (COCO names); every one must be found with score >= 0.5
EXPECTED = {
    "astronaut": "person",
    "coffee": "cup",
    "chelsea": "cat",
    "stereo_motorcycle": "motorcycle",
    "horse": "horse",
    "camera": "person",
}


def rgb(name: str) -> np.ndarray:
    image = getattr(photos, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    image = np.asarray(image)
    if image.dtype == bool:  # horse: a silhouette
        image = np.where(image, 255, 0).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


@pytest.fixture
async def service(database: Database, redis: Redis, key_prefix: str) -> AsyncIterator[Any]:
    manifests = {m.name: m for m in builtin_manifests()}
    pool = InferencePool([manifests[SSD], manifests[FACES]])
    await pool.start()
    await pool.wait_ready()
    served = vision(database, redis, key_prefix, pool)  # type: ignore[arg-type]
    try:
        yield served
    finally:
        await stop(served)
        await pool.close()


async def test_the_default_detector_finds_the_objects_of_the_photos(
    service: VisionService,
) -> None:
    images = {name: rgb(name) for name in EXPECTED}
    # at once: the pool runs them as batches
    found = await asyncio.gather(*(service.detect(image, SSD) for image in images.values()))
    for (name, label), result in zip(EXPECTED.items(), found, strict=True):
        labels = {o["label"] for o in result["objects"] if o["score"] >= 0.5}
        assert label in labels, (name, result["objects"])
        assert all(0.5 <= o["score"] <= 1 for o in result["objects"])  # the default threshold
    [person] = [o for o in found[0]["objects"] if o["label"] == "person"]
    box = person["box"]  # in the image's pixels (512 x 512): the astronaut fills its left part
    assert box["x"] < 40
    assert box["y"] < 40
    assert 300 < box["width"] < 420
    assert box["height"] > 450
    assert service._settings.detector == SSD  # the default

    coffee = images["coffee"]
    assert len((await service.detect(coffee, SSD))["objects"]) >= 2  # cup, bowl, table
    [only] = (await service.detect(coffee, SSD, max_detections=1))["objects"]
    assert only["label"] == "cup"
    strict = await service.detect(coffee, SSD, min_score=0.9)
    assert [o["label"] for o in strict["objects"]] == ["cup"]
    loose = await service.detect(coffee, SSD, min_score=0.1)
    assert len(loose["objects"]) > len(strict["objects"])


async def test_the_face_detector_scores_its_faces(service: VisionService) -> None:
    result = await service.detect(rgb("astronaut"), FACES)
    [face] = result["objects"]
    assert face["label"] == "face"
    assert face["score"] is not None
    assert 0.5 < face["score"] <= 1
    box = face["box"]
    assert 150 < box["x"] + box["width"] / 2 < 300  # her face, in the upper middle
    assert box["y"] < 200
    assert (await service.detect(rgb("coffee"), FACES))["objects"] == []


async def test_an_unknown_detector_or_bad_limits_are_refused(
    service: VisionService, database: Database
) -> None:
    principal = await new_principal(database)
    buffer = io.BytesIO()
    Image.fromarray(photos.coffee()).save(buffer, "JPEG")
    image = buffer.getvalue()
    for name in ("yolo-v8", "efficientnet-lite0"):  # unknown; a classifier, not a detector
        with pytest.raises(ValidationFailed) as refused:
            await service.analyze(principal, image, [VisionTask.DETECT], detector=name)
        assert refused.value.code == "BAD_USER_INPUT"
        assert f"{SSD}, {FACES}" in refused.value.message or (
            f"{FACES}, {SSD}" in refused.value.message
        )
        assert refused.value.details["field"] == "detector"
    for limits in ({"min_score": 1.5}, {"max_detections": 0}, {"max_detections": 10_000}):
        with pytest.raises(ValidationFailed):
            await service.analyze(principal, image, [VisionTask.DETECT], **limits)  # type: ignore[arg-type]
