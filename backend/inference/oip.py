"""Our models in the Open Inference Protocol (KServe v2, Triton's): each task's input and output
tensors (name, datatype, shape without the batch dimension), and the conversion of the items and
outputs the local pool passes (runtimes.py's) to and from them, on both sides of the wire. The
client (remote.py) and the server (serve.py) share this module, so the same pre- and
post-processing (backend/vision) runs around the model wherever it is served.

- classification: `image` FP32 [3, size, size] (preprocess.classification_input) -> `logits`
  FP32 [labels].
- detection: `image` UINT8 [h, w] (a cascade) or [h, w, 3], `min_score` FP32 [1],
  `max_detections` INT32 [1] -> `detections` FP32 [n, 6] (rows [class id, score, x0, y0, x1,
  y1], padded to the request's longest, at least one), `count` INT32 [1] (the real rows).
- ocr: `image` UINT8 [h, w, 3] -> `result` BYTES [1] (the runtime's dict as JSON).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from backend.inference.catalog import Task
from backend.inference.client import Priority, SignatureMismatch
from backend.inference.manifest import ManifestError, ModelManifest

DTYPES: dict[str, Any] = {
    "FP32": np.float32,
    "UINT8": np.uint8,
    "INT32": np.int32,
    "BYTES": np.object_,
}
DETECTION_COLUMNS = 6
# Triton's request priority (1 is served first) of ours; a server whose model has no priority
# levels accepts and ignores it
PRIORITY = {Priority.LIVE: 1, Priority.BATCH: 2}


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str  # the protocol's: FP32, UINT8, INT32, BYTES
    shape: tuple[int, ...]  # without the batch dimension; -1: any size

    @property
    def dtype(self) -> Any:
        return DTYPES[self.datatype]


@dataclass(frozen=True)
class Signature:
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]


def served(manifest: ModelManifest) -> bool:
    """Whether the protocol form covers the manifest's task."""
    return manifest.task in (Task.CLASSIFICATION, Task.DETECTION, Task.OCR)


def signature(manifest: ModelManifest) -> Signature:
    """The tensors a server of `manifest` takes and gives."""
    if manifest.task == Task.CLASSIFICATION:
        size = int(manifest.input.get("size", 224))
        classes = len(manifest.labels) or -1
        return Signature(
            (Tensor("image", "FP32", (3, size, size)),),
            (Tensor("logits", "FP32", (classes,)),),
        )
    if manifest.task == Task.DETECTION:
        image = (-1, -1) if manifest.runtime == "cascade" else (-1, -1, 3)
        return Signature(
            (
                Tensor("image", "UINT8", image),
                Tensor("min_score", "FP32", (1,)),
                Tensor("max_detections", "INT32", (1,)),
            ),
            (
                Tensor("detections", "FP32", (-1, DETECTION_COLUMNS)),
                Tensor("count", "INT32", (1,)),
            ),
        )
    if manifest.task == Task.OCR:
        return Signature(
            (Tensor("image", "UINT8", (-1, -1, 3)),),
            (Tensor("result", "BYTES", (1,)),),
        )
    raise ManifestError(f"{manifest.name}: no Open Inference Protocol form for {manifest.task}")


def check(manifest: ModelManifest, metadata: dict[str, Any]) -> None:
    """Raises SignatureMismatch unless a server's model metadata (`GET v2/models/M[/versions/V]`)
    has the tensors `manifest` needs: the same names and datatypes, and shapes that take what
    we send (a fixed size, or -1) and give what we read (ours -1 takes any size)."""
    expected = signature(manifest)
    problems: list[str] = []
    for kind, ours, theirs in (
        ("input", expected.inputs, metadata.get("inputs") or []),
        ("output", expected.outputs, metadata.get("outputs") or []),
    ):
        found = {t.get("name"): t for t in theirs}
        if set(found) != {t.name for t in ours}:
            problems.append(f"{kind}s {sorted(found)} (want {sorted(t.name for t in ours)})")
            continue
        for tensor in ours:
            other = found[tensor.name]
            if other.get("datatype") != tensor.datatype:
                problems.append(
                    f"{kind} {tensor.name} is {other.get('datatype')} (want {tensor.datatype})"
                )
            shape = [int(d) for d in other.get("shape") or []]
            if len(shape) == len(tensor.shape) + 1:  # a batching model's leading -1
                shape = shape[1:]
            if not _shape_fits(tensor.shape, shape, kind == "input"):
                problems.append(f"{kind} {tensor.name} has shape {shape} (want {tensor.shape})")
    if problems:
        raise SignatureMismatch(
            f"{manifest.name}@{manifest.version}: the served model does not match its manifest: "
            + "; ".join(problems)
        )


def _shape_fits(ours: tuple[int, ...], theirs: list[int], sent: bool) -> bool:
    if len(ours) != len(theirs):
        return False
    if sent:  # the server must take every size we may send
        return all(t in (-1, o) for o, t in zip(ours, theirs, strict=True))
    return all(o in (-1, t) for o, t in zip(ours, theirs, strict=True))


# -- the client's side: one item per request -------------------------------------------------------


def request_arrays(manifest: ModelManifest, item: Any) -> dict[str, np.ndarray]:
    """One item (what the pool's runtime takes) as the request's tensors, batch of one."""
    if manifest.task == Task.DETECTION:
        spec = manifest.input
        if isinstance(item, dict):
            image, min_score, most = (
                item["image"],
                item.get("min_score"),
                item.get("max_detections"),
            )
        else:
            image, min_score, most = item, None, None
        min_score = float(spec.get("min_score", 0.5) if min_score is None else min_score)
        most = int(spec.get("max_detections", 100) if most is None else most)
        return {
            "image": np.ascontiguousarray(image, dtype=np.uint8)[None],
            "min_score": np.asarray([[min_score]], dtype=np.float32),
            "max_detections": np.asarray([[most]], dtype=np.int32),
        }
    image = item["image"] if isinstance(item, dict) else item
    [tensor] = signature(manifest).inputs
    return {"image": np.ascontiguousarray(image, dtype=tensor.dtype)[None]}


def response_output(manifest: ModelManifest, arrays: dict[str, np.ndarray]) -> Any:
    """A response's tensors (batch of one) as the output the pool's runtime gives."""
    if manifest.task == Task.CLASSIFICATION:
        return np.asarray(arrays["logits"][0], dtype=np.float32)
    if manifest.task == Task.DETECTION:
        count = int(np.asarray(arrays["count"]).reshape(-1)[0])
        rows = np.asarray(arrays["detections"][0], dtype=np.float32)
        return rows.reshape(-1, DETECTION_COLUMNS)[:count]
    return json.loads(_text(np.asarray(arrays["result"]).reshape(-1)[0]))


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# -- the server's side: a request may hold several items ---------------------------------------


def request_items(manifest: ModelManifest, arrays: dict[str, np.ndarray]) -> list[Any]:
    """A request's tensors as the items the runtime takes (one per row of the batch)."""
    images = arrays["image"]
    if manifest.task == Task.DETECTION:
        scores = np.asarray(arrays["min_score"], dtype=np.float64).reshape(len(images), -1)
        most = np.asarray(arrays["max_detections"], dtype=np.int64).reshape(len(images), -1)
        return [
            {
                "image": images[i],
                "min_score": float(scores[i, 0]),
                "max_detections": int(most[i, 0]),
            }
            for i in range(len(images))
        ]
    if manifest.task == Task.OCR:
        return [{"image": image} for image in images]
    return list(images)


def response_arrays(manifest: ModelManifest, outputs: Sequence[Any]) -> dict[str, np.ndarray]:
    """The runtime's outputs for one request's items as the response's tensors."""
    if manifest.task == Task.CLASSIFICATION:
        return {"logits": np.stack([np.asarray(o, dtype=np.float32) for o in outputs])}
    if manifest.task == Task.DETECTION:
        rows = [np.asarray(o, dtype=np.float32).reshape(-1, DETECTION_COLUMNS) for o in outputs]
        # at least one row: PyTriton cannot move a tensor with no elements ("memoryview: cannot
        # cast view with zeros in shape"), so an image without detections gets one padded row
        longest = max(1, *(len(r) for r in rows))
        padded = np.zeros((len(rows), longest, DETECTION_COLUMNS), dtype=np.float32)
        for i, r in enumerate(rows):
            padded[i, : len(r)] = r
        counts = np.asarray([[len(r)] for r in rows], dtype=np.int32)
        return {"detections": padded, "count": counts}
    texts = [json.dumps(o, separators=(",", ":")).encode("utf-8") for o in outputs]
    return {"result": np.asarray(texts, dtype=np.object_).reshape(-1, 1)}
