"""Nothing leaves a self-hosted server: ONNX Runtime's telemetry is off in every process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _import_in_a_fresh_process(code: str, home: Path) -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")
    }
    subprocess.run(
        [sys.executable, "-c", code], env={**env, "HOME": str(home)}, check=True, timeout=120
    )


def test_onnx_runtime_writes_no_telemetry_id_under_sightline(tmp_path: Path) -> None:
    """ONNX Runtime 1.30, imported alone, writes a device id under ~/.cache/Microsoft and starts
    sending events to mobile.events.data.microsoft.com; imported by any part of Sightline
    (here the inference runtimes, which run alone on a GPU node) it does neither."""
    alone, sightline = tmp_path / "alone", tmp_path / "sightline"
    alone.mkdir()
    sightline.mkdir()
    _import_in_a_fresh_process("import onnxruntime", alone)
    if not (alone / ".cache" / "Microsoft").exists():
        pytest.skip("this ONNX Runtime writes no telemetry id: nothing to turn off")
    _import_in_a_fresh_process("import backend.inference.runtimes, onnxruntime", sightline)
    assert not (sightline / ".cache").exists() or not any(
        (sightline / ".cache").rglob("*onnxruntime*")
    )
