"""Running a model on a batch, inside a worker process. A loaded model is a function from a list
of inputs (numpy arrays) to a list of outputs, one per input."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from backend.inference._transport import stacked
from backend.inference.manifest import ManifestError, ModelManifest

BatchFn = Callable[[list[Any]], list[Any]]


def _import(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def out_of_memory(exc: BaseException) -> bool:
    """A GPU (or host) allocation failure: the batch can be split and tried again."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _idle_threads_sleep() -> None:
    """OpenMP's threads (torch's) wait for work asleep instead of spinning. libgomp reads the
    policy when it loads, so this holds for a worker that has not imported torch yet. Measured
    on 2 loaded cores: EfficientNet-Lite0 on 2 threads with idle gaps between images (a server's
    traffic) took 0.5 CPU-seconds an image spinning, 0.04 with this, 0.03 on one thread."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def resolve_device(device: str) -> str:
    """`auto`: the first GPU when torch sees one, else the CPU."""
    if device != "auto":
        return device
    try:
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def load(manifest: ModelManifest, device: str, threads: int = 1) -> BatchFn:
    _idle_threads_sleep()
    manifest.verify()
    device = (
        resolve_device(device)
        if manifest.runtime in ("torch", "torchscript", "onnx", "torchvision")
        else "cpu"
    )
    loaders: dict[str, Callable[[], BatchFn]] = {
        "python": lambda: _import(manifest.loader or "")(manifest),
        "torch": lambda: _torch(manifest, device, threads),
        "torchscript": lambda: _torch(manifest, device, threads),
        "onnx": lambda: _onnx(manifest, device, threads),
        "cascade": lambda: _cascade(manifest),
        "opencv-dnn": lambda: _opencv_dnn(manifest, threads),
        "rapidocr": lambda: _rapidocr(manifest, threads),
        "torchvision": lambda: _torchvision(manifest, device, threads),
    }
    loader = loaders.get(manifest.runtime)
    if loader is not None:
        return loader()
    if manifest.in_process:
        raise ManifestError(f"{manifest.name}: runtime {manifest.runtime} runs in the server")
    raise ManifestError(f"{manifest.name}: no runtime {manifest.runtime}")


def _torchvision(manifest: ModelManifest, device: str, threads: int) -> BatchFn:
    """Imports torchvision, which only requirements-gpu.txt installs."""
    from backend.inference import torchvision_runtime

    return torchvision_runtime.load(manifest, device, threads, _detection_request)


def _torch(manifest: ModelManifest, device: str, threads: int) -> BatchFn:
    import torch

    torch.set_num_threads(threads)
    if manifest.runtime == "torchscript":
        model = torch.jit.load(manifest.weights, map_location=device)
    else:
        model = _import(manifest.loader or "")(manifest.weights)
    model = model.to(device).eval()
    images = int(manifest.input.get("size", 0)) > 0  # NCHW images: channels-last runs faster
    if images:
        model = model.to(memory_format=torch.channels_last)

    def run(batch: list[Any]) -> list[Any]:
        with torch.inference_mode():
            x = torch.from_numpy(stacked(batch)).to(device)
            if images:
                x = x.contiguous(memory_format=torch.channels_last)
            y = model(x)
        return list(y.float().cpu().numpy())

    return run


def _onnx_session(path: str, device: str, threads: int, memory_arena: bool = True) -> Any:
    """An onnxruntime session on `threads` CPU threads (and the GPU for a `cuda` device), fully
    optimised. Its threads sleep between operators instead of spinning: a worker shares its
    cores with the server and with other processes, and on a loaded 2-core machine spinning
    took 1.8 CPU-seconds for a RapidOCR page that costs 1.05 with one thread, and was slower.
    The memory arena keeps buffers between runs (RapidOCR's line shapes vary): 7% less CPU."""
    import onnxruntime

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        providers.insert(0, "CUDAExecutionProvider")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = memory_arena
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(path, sess_options=options, providers=providers)


def _onnx(manifest: ModelManifest, device: str, threads: int) -> BatchFn:
    session = _onnx_session(manifest.weights or "", device, threads)
    name = session.get_inputs()[0].name

    def run(batch: list[Any]) -> list[Any]:
        [y] = session.run(None, {name: stacked(batch)})[:1]
        return list(y)

    return run


# -- detectors ---------------------------------------------------------------------------------
#
# A detector's input is an image, or a dict {"image": ..., "min_score": ..., "max_detections":
# ...} (a request's own limits); its output per image is a float32 array of rows
# [class id, score, x0, y0, x1, y1], the corners as fractions of the image's width and height.

DETECTION_COLUMNS = 6


def _detection_request(item: Any, spec: dict[str, Any]) -> tuple[np.ndarray, float, int]:
    if isinstance(item, dict):
        image = item["image"]
        min_score = item.get("min_score")
        most = item.get("max_detections")
    else:
        image, min_score, most = item, None, None
    min_score = float(spec.get("min_score", 0.5) if min_score is None else min_score)
    most = int(spec.get("max_detections", 100) if most is None else most)
    return np.asarray(image), min_score, most


def _no_detections() -> np.ndarray:
    return np.zeros((0, DETECTION_COLUMNS), dtype=np.float32)


def _cascade(manifest: ModelManifest) -> BatchFn:
    """OpenCV cascade detector, per image (grayscale uint8). Its score is the last stage's
    margin (the sum of its weak classifiers above the stage's threshold: `detectMultiScale3`'s
    level weight) through a logistic: 0.5 at the threshold, near 1 for a clear face."""
    import cv2

    detector = cv2.CascadeClassifier(manifest.weights)
    if detector.empty():
        raise ManifestError(f"{manifest.name}: cannot read cascade {manifest.weights}")
    min_size = int(manifest.input.get("min_size", 24))
    threshold = _last_stage_threshold(manifest.weights or "")

    def run(batch: list[Any]) -> list[Any]:
        out = []
        for item in batch:
            image, min_score, most = _detection_request(item, manifest.input)
            height, width = image.shape[:2]
            boxes, _levels, weights = detector.detectMultiScale3(
                image,
                scaleFactor=1.1,
                minNeighbors=5,
                minSize=(min_size, min_size),
                outputRejectLevels=True,
            )
            rows = _no_detections()
            if len(boxes):
                xywh = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
                margin = np.asarray(weights, dtype=np.float64).reshape(-1) - threshold
                scores = (1 / (1 + np.exp(-margin))).astype(np.float32)
                rows = np.column_stack(
                    [
                        np.zeros(len(xywh), dtype=np.float32),
                        scores,
                        xywh[:, 0] / width,
                        xywh[:, 1] / height,
                        (xywh[:, 0] + xywh[:, 2]) / width,
                        (xywh[:, 1] + xywh[:, 3]) / height,
                    ]
                ).astype(np.float32)
                rows = rows[rows[:, 1] >= min_score]
                rows = rows[np.argsort(-rows[:, 1], kind="stable")][:most]
            out.append(rows)
        return out

    return run


def _last_stage_threshold(path: str) -> float:
    """The threshold of a cascade's last stage (0 where the file does not say)."""
    import cv2

    storage = cv2.FileStorage(path, cv2.FILE_STORAGE_READ)
    try:
        stages = storage.getNode("cascade").getNode("stages")
        if stages.empty() or stages.size() == 0:
            return 0.0
        node = stages.at(stages.size() - 1).getNode("stageThreshold")
        return 0.0 if node.empty() else float(node.real())
    finally:
        storage.release()


def _opencv_dnn(manifest: ModelManifest, threads: int) -> BatchFn:
    """A detection graph run by OpenCV's dnn module (TensorFlow .pb with its .pbtxt, Caffe
    .caffemodel with its .prototxt, ONNX), whose output is SSD's DetectionOutput: rows of
    [image, class, score, x0, y0, x1, y1] for the whole batch. Images come RGB at the
    graph's size (`input.width` x `input.height`); they run as one blob when `input.batch` is
    true (the default), else one by one. Then per image: the request's score threshold, per
    class non-maximum suppression (`input.iou`), the request's maximum of detections."""
    import cv2

    cv2.setNumThreads(threads)
    try:
        net = cv2.dnn.readNet(manifest.weights or "", manifest.config or "")
    except cv2.error as exc:
        raise ManifestError(f"{manifest.name}: OpenCV cannot read the graph: {exc}") from exc
    spec = manifest.input
    size = (int(spec.get("width", 300)), int(spec.get("height", 300)))
    scale = float(spec.get("scale", 1.0))
    mean = spec.get("mean", 0.0)
    mean = tuple(float(m) for m in mean) if isinstance(mean, list | tuple) else (float(mean),) * 3
    swap_rb = bool(spec.get("swap_rb", False))  # True for graphs trained on BGR (Caffe's)
    batched = bool(spec.get("batch", True))
    iou = float(spec.get("iou", 0.5))
    background = int(spec.get("background", 0))

    def forward(images: list[np.ndarray]) -> np.ndarray:
        blob = cv2.dnn.blobFromImages(images, scale, size, mean, swap_rb, crop=False)
        net.setInput(blob)
        output = np.asarray(net.forward(), dtype=np.float32)
        if output.shape[-1] != 7:  # checked by the warm-up run: such a graph never serves
            raise ManifestError(
                f"{manifest.name}: the graph's output {output.shape} is not SSD's "
                "DetectionOutput (rows of 7: image, class, score, x0, y0, x1, y1)"
            )
        return output.reshape(-1, 7)

    def select(rows: np.ndarray, min_score: float, most: int) -> np.ndarray:
        rows = rows[(rows[:, 2] >= min_score) & (rows[:, 1] != background)]
        if not len(rows) or most < 1:
            return _no_detections()
        corners = np.clip(rows[:, 3:7], 0.0, 1.0)
        boxes = [
            (float(x0), float(y0), float(x1 - x0), float(y1 - y0)) for x0, y0, x1, y1 in corners
        ]
        keep = cv2.dnn.NMSBoxesBatched(
            boxes,
            rows[:, 2].tolist(),
            rows[:, 1].astype(np.int32).tolist(),
            min_score,
            iou,
            top_k=most,
        )
        keep = np.asarray(keep, dtype=np.int64).reshape(-1)[:most]
        return np.column_stack([rows[keep, 1], rows[keep, 2], corners[keep]]).astype(np.float32)

    def run(batch: list[Any]) -> list[Any]:
        requests = [_detection_request(item, spec) for item in batch]
        images = [image for image, _, _ in requests]
        if batched and len({image.shape for image in images}) == 1:
            outputs = forward(images)
            per_image = [outputs[outputs[:, 0] == i] for i in range(len(images))]
        else:
            per_image = [forward([image]) for image in images]
        return [
            select(rows, min_score, most)
            for rows, (_, min_score, most) in zip(per_image, requests, strict=True)
        ]

    return run


# -- OCR -----------------------------------------------------------------------------------------
#
# An OCR model's input is an RGB uint8 image, or a dict {"image": ...}; its output per image is
# {"text", "lines", "words"}, each line and word {"text", "confidence", "box": {x, y, width,
# height}} in the input's pixels (Tesseract's shape).


def _rapidocr(manifest: ModelManifest, threads: int) -> BatchFn:
    """RapidOCR (PP-OCR text detection, orientation and recognition on onnxruntime) from the
    manifest's verified `files` (never a download). Its text detection scales the long side to
    at most `input.limit_side_len` (`limit_type` max): RapidOCR's default scales the short side
    up, which takes seconds on a small image. The orientation classifier runs only with
    `input.use_cls`; text lines are recognised `input.rec_batch_num` at a time (a batch is
    padded to its widest line). Images run one by one, each on the worker's `threads`.

    Where the time goes (the bench's pages, one thread): recognition about 85% (it grows with
    the characters of a page, about 1.7 ms of CPU each: a line is resized to 48 px high),
    text detection about 12%, word boxes the rest. The stages run on this module's sessions
    (`_onnx_session`: threads that sleep, a memory arena) in place of RapidOCR's own, whose
    threads spin; with several threads, lines are recognised side by side (`_LinesSideBySide`)."""
    import cv2
    from rapidocr import RapidOCR

    spec = manifest.input
    files = manifest.files
    params: dict[str, Any] = {
        "Global.log_level": "warning",
        "Global.use_cls": "cls" in files and bool(spec.get("use_cls", False)),
        "Global.return_word_box": True,
        "Global.text_score": float(spec.get("text_score", 0.5)),
        "Det.model_path": files["det"]["path"],
        "Det.limit_type": str(spec.get("limit_type", "max")),
        "Det.limit_side_len": int(spec.get("limit_side_len", 960)),
        "Rec.model_path": files["rec"]["path"],
        "Rec.rec_batch_num": int(spec.get("rec_batch_num", 1)),
        "EngineConfig.onnxruntime.intra_op_num_threads": threads,
        "EngineConfig.onnxruntime.inter_op_num_threads": 1,
    }
    if "cls" in files:
        params["Cls.model_path"] = files["cls"]["path"]
    engine = RapidOCR(params=params)
    stages = [("det", engine._load_det_model()), ("rec", engine._load_rec_model())]
    if params["Global.use_cls"]:
        stages.append(("cls", engine._load_cls_model()))
    for role, stage in stages:
        # rapidocr 3.10: a stage's OrtInferSession runs the InferenceSession at `.session`
        runner = getattr(stage, "session", None)
        if runner is not None and hasattr(runner, "session"):
            # with several threads, lines are recognised side by side, one thread each
            per_run = 1 if role == "rec" and threads > 1 else threads
            runner.session = _onnx_session(files[role]["path"], "cpu", per_run)
    if threads > 1:
        engine.text_rec = _LinesSideBySide(engine.text_rec, threads)

    def read(item: Any) -> dict[str, Any]:
        image = np.asarray(item["image"] if isinstance(item, dict) else item)
        if image.ndim == 2:
            bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        else:
            bgr = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2BGR)
        found = engine(bgr)
        return _ocr_result(found.boxes, found.txts, found.scores, found.word_results)

    # the warm-up: a line of text, so that detection, orientation and recognition all run
    sample = np.full((64, 320, 3), 255, dtype=np.uint8)
    cv2.putText(sample, "Sightline 42", (8, 44), cv2.FONT_HERSHEY_SIMPLEX, 1.2, (0, 0, 0), 2)
    read(sample)
    return lambda batch: [read(item) for item in batch]


class _LinesSideBySide:
    """RapidOCR's line recogniser on `threads` lines at a time, each on one thread, instead of
    every line on `threads` threads: no wait for the slowest thread after each operator.
    Measured on the bench's pages (2 threads, loaded machine): 9% less CPU a page and a quarter
    less time than 2 threads per operator, the same text. Lines are dealt out in order of width
    so that the threads' shares come out even; the results go back in the lines' order."""

    def __init__(self, recognise: Any, threads: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._recognise = recognise
        self._threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="rapidocr-lines")

    def __call__(self, request: Any) -> Any:
        import dataclasses

        images = request.img if isinstance(request.img, list) else [request.img]
        if len(images) < 2:
            return self._recognise(request)
        order = sorted(range(len(images)), key=lambda i: images[i].shape[1] / images[i].shape[0])
        shares = [order[k :: self._threads] for k in range(min(self._threads, len(images)))]
        found = list(
            self._pool.map(
                lambda share: self._recognise(
                    dataclasses.replace(request, img=[images[i] for i in share])
                ),
                shares,
            )
        )
        texts: list[Any] = [None] * len(images)
        scores: list[Any] = [None] * len(images)
        words: list[Any] = [None] * len(images)
        for share, out in zip(shares, found, strict=True):
            for position, index in enumerate(share):
                texts[index] = out.txts[position]
                scores[index] = out.scores[position]
                words[index] = out.word_results[position]
        return dataclasses.replace(
            found[0],
            imgs=images,
            txts=tuple(texts),
            scores=tuple(scores),
            word_results=tuple(words),
            elapse=max(out.elapse or 0.0 for out in found),
        )


def _box(points: Any) -> dict[str, int]:
    """The upright box around a quadrilateral's (or rectangle's) points."""
    corners = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    x0, y0 = np.floor(corners.min(axis=0))
    x1, y1 = np.ceil(corners.max(axis=0))
    return {"x": int(x0), "y": int(y0), "width": int(x1 - x0), "height": int(y1 - y0)}


def _split_words(text: str, score: float, box: dict[str, int]) -> list[dict[str, Any]]:
    """Words of a line without word boxes: the line's box cut in proportion to characters."""
    words: list[dict[str, Any]] = []
    if not text:
        return words
    per_char = box["width"] / len(text)
    position = 0
    for word in text.split(" "):
        if word:
            words.append(
                {
                    "text": word,
                    "confidence": round(float(score), 4),
                    "box": {
                        "x": box["x"] + round(position * per_char),
                        "y": box["y"],
                        "width": max(1, round(len(word) * per_char)),
                        "height": box["height"],
                    },
                }
            )
        position += len(word) + 1
    return words


def _ocr_result(boxes: Any, texts: Any, scores: Any, word_results: Any) -> dict[str, Any]:
    lines: list[dict[str, Any]] = []
    words: list[dict[str, Any]] = []
    if boxes is None or texts is None:
        return {"text": "", "lines": lines, "words": words}
    per_line = list(word_results or ())
    for index, (quad, found_text, score) in enumerate(
        zip(boxes, texts, scores or (), strict=False)
    ):
        text = str(found_text).strip()
        if not text:
            continue
        box = _box(quad)
        lines.append({"text": text, "confidence": round(float(score), 4), "box": box})
        found = per_line[index] if index < len(per_line) else None
        line_words = [
            {"text": str(w).strip(), "confidence": round(float(c), 4), "box": _box(b)}
            for w, c, b in (found or ())
            if b is not None and str(w).strip()
        ]
        words += line_words or _split_words(text, float(score), box)
    return {"text": "\n".join(line["text"] for line in lines), "lines": lines, "words": words}
