"""The Open Inference Protocol form of our models: the metadata check, and items and outputs
through the wire form and back (both sides), without a server."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from backend.inference import oip
from backend.inference.catalog import Task
from backend.inference.client import ModelUnavailable, SignatureMismatch
from backend.inference.manifest import ManifestError, ModelManifest

CLASSIFIER = ModelManifest(
    name="c", version="1", task=Task.CLASSIFICATION, runtime="onnx", weights="w.onnx",
    input={"size": 32}, labels=("a", "b", "c"),
)  # fmt: skip
DETECTOR = ModelManifest(
    name="d", version="1", task=Task.DETECTION, runtime="opencv-dnn", weights="g.pb",
    input={"min_score": 0.4, "max_detections": 7},
)  # fmt: skip
OCR = ModelManifest(
    name="o", version="1", task=Task.OCR, runtime="rapidocr",
    files={"det": {"path": "d"}, "rec": {"path": "r"}},
)  # fmt: skip


def metadata(manifest: ModelManifest, batch: bool = True) -> dict:
    """What Triton answers for a model bound from `manifest` (a batching one: a leading -1)."""
    tensors = oip.signature(manifest)

    def describe(tensor: oip.Tensor) -> dict:
        shape = ([-1] if batch else []) + list(tensor.shape)
        return {"name": tensor.name, "datatype": tensor.datatype, "shape": shape}

    return {
        "name": manifest.name,
        "inputs": [describe(t) for t in tensors.inputs],
        "outputs": [describe(t) for t in tensors.outputs],
    }


@pytest.mark.parametrize("manifest", [CLASSIFIER, DETECTOR, OCR])
@pytest.mark.parametrize("batch", [True, False])
def test_a_model_bound_from_its_manifest_passes(manifest: ModelManifest, batch: bool) -> None:
    oip.check(manifest, metadata(manifest, batch))


def test_mismatches_are_typed_and_name_what_differs() -> None:
    served = metadata(CLASSIFIER)
    served["inputs"][0]["shape"] = [-1, 3, 64, 64]
    with pytest.raises(SignatureMismatch, match=r"input image has shape \[3, 64, 64\]") as error:
        oip.check(CLASSIFIER, served)
    assert error.value.code == "MODEL_SIGNATURE_MISMATCH"
    assert isinstance(error.value, ModelUnavailable)  # the version does not serve

    served = metadata(CLASSIFIER)
    served["outputs"][0]["datatype"] = "FP16"
    with pytest.raises(SignatureMismatch, match="output logits is FP16"):
        oip.check(CLASSIFIER, served)

    served = metadata(DETECTOR)
    served["inputs"] = served["inputs"][:1]
    with pytest.raises(SignatureMismatch, match="inputs"):
        oip.check(DETECTOR, served)

    # a server that takes any size takes ours; one that gives a fixed number of labels other
    # than ours does not match
    served = metadata(CLASSIFIER)
    served["inputs"][0]["shape"] = [-1, 3, -1, -1]
    oip.check(CLASSIFIER, served)
    served["outputs"][0]["shape"] = [-1, 1000]
    with pytest.raises(SignatureMismatch, match="output logits"):
        oip.check(CLASSIFIER, served)


def test_a_task_without_a_wire_form_is_refused() -> None:
    manifest = dataclasses.replace(CLASSIFIER, task=Task.SAFETY)
    assert not oip.served(manifest)
    with pytest.raises(ManifestError):
        oip.signature(manifest)


def _round_trip(manifest: ModelManifest, items: list, outputs: list) -> tuple[list, list]:
    """Items through the client's encoding and the server's decoding; outputs back."""
    requests = [oip.request_arrays(manifest, item) for item in items]
    received = [oip.request_items(manifest, arrays) for arrays in requests]
    responses = [oip.response_arrays(manifest, [out]) for out in outputs]
    return received, [oip.response_output(manifest, arrays) for arrays in responses]


def test_items_and_outputs_cross_the_wire_unchanged() -> None:
    x = np.random.default_rng(0).random((3, 32, 32), dtype=np.float32)
    [[got]], [logits] = _round_trip(CLASSIFIER, [x], [np.arange(3, dtype=np.float32)])
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(logits, [0, 1, 2])

    image = np.zeros((20, 30, 3), np.uint8)
    rows = np.asarray([[1, 0.9, 0.1, 0.1, 0.5, 0.5], [2, 0.8, 0, 0, 1, 1]], np.float32)
    received, outputs = _round_trip(
        DETECTOR,
        [{"image": image, "min_score": 0.7, "max_detections": 2}, image],
        [rows, rows[:0]],
    )
    assert received[0][0]["min_score"] == pytest.approx(0.7)
    assert received[0][0]["max_detections"] == 2
    # a bare image takes the manifest's limits
    assert received[1][0]["min_score"] == pytest.approx(0.4)
    assert received[1][0]["max_detections"] == 7
    np.testing.assert_array_equal(outputs[0], rows)
    assert outputs[1].shape == (0, 6)

    found = {"text": "Zoë 42", "lines": [], "words": []}
    _, [read] = _round_trip(OCR, [{"image": image}], [found])
    assert read == found


def test_detections_of_one_request_are_padded_to_its_longest() -> None:
    rows = np.ones((3, 6), np.float32)
    arrays = oip.response_arrays(DETECTOR, [rows, rows[:1]])
    assert arrays["detections"].shape == (2, 3, 6)
    assert arrays["count"].reshape(-1).tolist() == [3, 1]


def test_no_detections_still_send_a_row() -> None:
    """PyTriton cannot move a tensor with no elements: one padded row, a count of 0."""
    arrays = oip.response_arrays(DETECTOR, [np.zeros((0, 6), np.float32)])
    assert arrays["detections"].shape == (1, 1, 6)
    assert arrays["count"].reshape(-1).tolist() == [0]
    assert oip.response_output(DETECTOR, arrays).shape == (0, 6)
