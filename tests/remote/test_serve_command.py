"""`sightline inference serve` refuses what it cannot serve in one line, before Triton starts."""

from __future__ import annotations

import socket

from typer.testing import CliRunner

from backend.cli import app
from tests.conftest import free_port

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
