"""OCR with Tesseract (tesserocr): one reused `PyTessBaseAPI` per OCR thread (creating one
costs tens of milliseconds), language a parameter, words and lines with boxes and confidences."""

from __future__ import annotations

import asyncio
import importlib.metadata
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from backend.errors import AppError, ValidationFailed
from backend.inference.catalog import Task
from backend.inference.manifest import ModelManifest
from backend.vision.preprocess import for_ocr

TESSERACT = "tesseract"  # the OCR model this process runs (the others are the pool's)


class OcrUnavailable(AppError):
    code = "OCR_UNAVAILABLE"
    status = 503


class OcrEngine:
    def __init__(self, tessdata: Path, threads: int = 1) -> None:
        self._tessdata = tessdata
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="sightline-ocr")
        self._local = threading.local()

    @property
    def version(self) -> str:
        import tesserocr

        return str(tesserocr.tesseract_version().split()[1])

    def manifest(self) -> ModelManifest | None:
        """This process's Tesseract as a registry model's version (its version is Tesseract's),
        or None without tesserocr. The registry's other versions of the model may run on the
        inference pool (RapidOCR), so that an OCR policy can compare the two engines."""
        try:
            version = self.version
            source = f"tesserocr=={importlib.metadata.version('tesserocr')}"
        except (ImportError, importlib.metadata.PackageNotFoundError):
            return None
        return ModelManifest(
            name=TESSERACT,
            version=version,
            task=Task.OCR,
            runtime="tesseract",
            input={"tessdata": str(self._tessdata)},
            source=source,
            licence="Apache-2.0",
        )

    def languages(self) -> list[str]:
        if not self._tessdata.is_dir():
            return []
        return sorted(p.stem for p in self._tessdata.glob("*.traineddata") if p.stem != "osd")

    async def read(self, rgb: np.ndarray, language: str = "eng") -> dict[str, Any]:
        known = self.languages()
        if not known:
            raise OcrUnavailable(
                f"no Tesseract language data in {self._tessdata} "
                "(apt-get install tesseract-ocr-eng)"
            )
        if any(part not in known for part in language.split("+")):
            raise ValidationFailed(
                f"unknown OCR language {language!r}; known: {', '.join(known)}", field="language"
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._read, rgb, language)

    async def warm(self, language: str = "eng") -> None:
        """Creates a Tesseract engine and reads a blank page once."""
        await self.read(np.full((32, 128, 3), 255, dtype=np.uint8), language)

    def _api(self, language: str) -> Any:
        import tesserocr

        apis: dict[str, Any] = self._local.__dict__.setdefault("apis", {})
        if language not in apis:
            apis[language] = tesserocr.PyTessBaseAPI(
                path=str(self._tessdata), lang=language, psm=tesserocr.PSM.AUTO
            )
        return apis[language]

    def _read(self, rgb: np.ndarray, language: str) -> dict[str, Any]:
        import tesserocr

        clean = for_ocr(rgb)
        scale = rgb.shape[1] / clean.shape[1]
        api = self._api(language)
        api.SetImage(Image.fromarray(clean))
        api.Recognize()
        text = api.GetUTF8Text().strip()

        def items(level: Any) -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = []
            iterator = api.GetIterator()
            if iterator is None:
                return found
            for part in tesserocr.iterate_level(iterator, level):
                try:
                    value = part.GetUTF8Text(level)
                except RuntimeError:  # an empty block
                    continue
                box = part.BoundingBox(level)
                if not value or not value.strip() or box is None:
                    continue
                x1, y1, x2, y2 = (round(v * scale) for v in box)
                found.append(
                    {
                        "text": value.strip(),
                        "confidence": round(part.Confidence(level) / 100, 4),
                        "box": {"x": x1, "y": y1, "width": x2 - x1, "height": y2 - y1},
                    }
                )
            return found

        words = items(tesserocr.RIL.WORD)
        lines = items(tesserocr.RIL.TEXTLINE)
        api.Clear()
        return {"text": text, "language": language, "lines": lines, "words": words}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
