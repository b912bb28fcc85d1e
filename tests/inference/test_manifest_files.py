"""Manifests of several files (RapidOCR's det, rec, cls): an operator's JSON names them
relative to its folder, each is checked against its sha256, and a runtime that needs some
refuses a manifest without them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from backend.inference.manifest import ManifestError, ModelManifest, load_manifests


def test_files_resolve_beside_the_manifest_and_are_checked(tmp_path: Path) -> None:
    (tmp_path / "det.onnx").write_bytes(b"det")
    (tmp_path / "rec.onnx").write_bytes(b"rec")
    good = hashlib.sha256(b"det").hexdigest()
    (tmp_path / "ocr.json").write_text(
        json.dumps(
            {
                "name": "my-ocr",
                "version": "1",
                "task": "ocr",
                "runtime": "rapidocr",
                "files": {
                    "det": {"path": "det.onnx", "sha256": good},
                    "rec": {"path": "rec.onnx", "sha256": "0" * 64},
                },
            }
        )
    )
    [manifest] = [m for m in load_manifests(tmp_path) if m.name == "my-ocr"]
    assert manifest.files["det"]["path"] == str(tmp_path / "det.onnx")
    assert [role for role, _, _ in manifest.model_files()] == ["det", "rec"]
    with pytest.raises(ManifestError, match="rec do not match their sha256"):
        manifest.verify()
    again = ModelManifest.from_dict(manifest.to_dict())  # as a worker receives it
    assert again == manifest


def test_rapidocr_needs_detection_and_recognition_files() -> None:
    with pytest.raises(ManifestError, match="needs files det and rec"):
        ModelManifest(
            name="half", version="1", task="ocr", runtime="rapidocr", files={"det": {"path": "x"}}
        )  # type: ignore[arg-type]
    with pytest.raises(ManifestError, match="needs a path"):
        ModelManifest.from_dict(
            {
                "name": "no-path",
                "version": "1",
                "task": "ocr",
                "runtime": "rapidocr",
                "files": {"det": {"path": "a"}, "rec": {"sha256": "b"}},
            }
        )
