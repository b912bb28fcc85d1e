"""`sightline inference serve` as a child process of the test session, on loopback ports of its
own: owned by a fixture (killed at teardown, with its Triton server, in its own process group),
and dying with the test process (`--parent-pid`). Its tests skip where PyTriton is not installed
(requirements-serve.txt)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backend.inference.manifest import ModelManifest, builtin_manifests
from tests.agents.test_runs import account, chat_settings, llm  # noqa: F401
from tests.conftest import dies_with_tests, free_port, scaled

ROOT = Path(__file__).resolve().parents[2]
# Fast to load: the classifier, the face cascade and the SSD detector (the bench's models), and
# the cascade again as an operator's manifest with a queue of one (Triton refuses beyond it)
MODELS = ("efficientnet-lite0", "haar-frontalface", "ssd-mobilenet-v2-coco", "haar-one-queued")


def one_queued() -> ModelManifest:
    [face] = [m for m in builtin_manifests() if m.name == "haar-frontalface"]
    return dataclasses.replace(face, name="haar-one-queued", max_batch=1, max_queue=1)


@dataclass
class InferenceService:
    """One `sightline inference serve` process on loopback; start, kill (-9, the whole group)
    and start again on the same ports."""

    http_port: int
    grpc_port: int
    metrics_port: int
    log: Path
    models_dir: Path  # operators' manifests
    models: tuple[str, ...] = MODELS  # what it serves
    process: subprocess.Popen[bytes] | None = None
    models: tuple[str, ...] = MODELS

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = scaled(240)) -> None:
        command = [sys.executable, "-m", "backend", "inference", "serve"]
        for model in self.models:
            command += ["--model", model]
        command += [
            "--host",
            "127.0.0.1",
            "--http-port",
            str(self.http_port),
            "--grpc-port",
            str(self.grpc_port),
            "--metrics-port",
            str(self.metrics_port),
            "--parent-pid",  # it dies with the test process (its Triton with it)
            str(os.getpid()),
        ]
        env = {
            **os.environ,
            "SIGHTLINE_VISION_THREADS": "1",
            # Triton's stub's numpy-1 environment, made by the first run and kept (gitignored)
            "SIGHTLINE_VISION_SERVE_STUB_ENV": str(ROOT / ".venv-triton-stub"),
            "SIGHTLINE_VISION_MODELS_DIR": str(self.models_dir),
            "SIGHTLINE_DATA_DIR": str(self.models_dir),  # PyTriton's workspaces
        }
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                dies_with_tests(command),
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: killed as one
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log.read_text()[-4000:]
                raise RuntimeError(f"inference serve exited {self.process.returncode}:\n{tail}")
            if self.ready():
                return
            time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"inference serve not ready:\n{self.log.read_text()[-4000:]}")

    def ready(self) -> bool:
        """Every model ready (the server says it is ready before they are bound)."""
        try:
            for model in self.models:
                with urllib.request.urlopen(
                    f"http://{self.url}/v2/models/{model}/ready", timeout=2
                ) as answer:
                    if answer.status != 200:
                        return False
        except OSError:
            return False
        return True

    def metric(self, name: str, model: str) -> float:
        """One of Triton's Prometheus counters for a model (summed over its versions), e.g.
        `nv_inference_request_success` (requests) and `nv_inference_exec_count` (batches run)."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=scaled(10)
        ) as answer:
            text = answer.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(f"{name}{{") and f'model="{model}"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    def kill(self) -> None:
        """SIGKILL to the whole group (the server, Triton, its Python stubs)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=scaled(30))
        self.process = None


@pytest.fixture(scope="session")
def inference_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceService]:
    if importlib.util.find_spec("pytriton") is None:
        pytest.skip("PyTriton is not installed (requirements-serve.txt)")
    folder = tmp_path_factory.mktemp("serve")
    (folder / "one-queued.json").write_text(json.dumps(one_queued().to_dict()), "utf-8")
    service = InferenceService(
        free_port(), free_port(), free_port(), log=folder / "serve.log", models_dir=folder
    )
    service.start()
    try:
        yield service
    finally:
        service.kill()
