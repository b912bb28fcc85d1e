"""`sightline inference serve` refuses what it cannot serve in one line, before Triton starts."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from backend.cli import app
from backend.inference.serve import workspace_root
from tests.conftest import free_port, scaled
from tests.remote.conftest import InferenceService

runner = CliRunner()


def _serve(*args: str) -> list[str]:
    ports = ["--http-port", str(free_port()), "--grpc-port", str(free_port())]
    return ["inference", "serve", "--host", "127.0.0.1", *ports, *args]


def test_an_unknown_model_is_refused_by_name() -> None:
    result = runner.invoke(app, _serve("--model", "yolo"))
    assert result.exit_code == 1
    assert "no manifest named yolo" in result.output
    assert "efficientnet-lite0" in result.output  # what there is


def test_a_port_in_use_is_refused_before_anything_starts() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = runner.invoke(app, _serve("--model", "haar-frontalface", "--metrics-port", port))
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.output


def test_sigterm_stops_triton_and_removes_its_workspace(tmp_path: Path) -> None:
    """Kubernetes stops a pod with SIGTERM: the server stops Triton as on SIGINT (its process
    group empties, its workspace is removed) instead of dying and leaving both behind."""
    if importlib.util.find_spec("pytriton") is None:
        pytest.skip("PyTriton is not installed (requirements-serve.txt)")
    service = InferenceService(
        free_port(),
        free_port(),
        free_port(),
        log=tmp_path / "serve.log",
        models_dir=tmp_path,
        models=("haar-frontalface",),  # the fastest to load
    )
    service.start()
    assert service.process is not None
    pid = service.process.pid
    # pytest's tmp_path is deep enough that the workspace goes to the short place instead
    root = workspace_root(tmp_path / "triton-workspaces", service.models)
    assert (root / str(pid)).is_dir()
    try:
        service.process.send_signal(signal.SIGTERM)
        service.process.wait(timeout=scaled(60))
    finally:
        service.kill()  # a server that ignored it: the group, at once
    assert not (root / str(pid)).exists()
    deadline = time.monotonic() + scaled(30)
    while time.monotonic() < deadline and _group_alive(pid):
        time.sleep(0.2)
    assert not _group_alive(pid), "Triton outlived the server"


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_workspace_too_deep_for_unix_sockets_goes_to_a_short_place(tmp_path: Path) -> None:
    """PyTriton binds Unix sockets inside its workspace (108 bytes at most, the path included):
    a deep data directory would leave every model UNAVAILABLE."""
    models = ("ssd-mobilenet-v2-coco",)
    assert workspace_root(Path("/var/lib/sightline/triton-workspaces"), models) == Path(
        "/var/lib/sightline/triton-workspaces"
    )
    deep = tmp_path / ("d" * 60) / "triton-workspaces"
    short = workspace_root(deep, models)
    assert short != deep
    assert len(str(short / "4194304" / "ssd-mobilenet-v2-coco_0_0-server.sock")) <= 107
