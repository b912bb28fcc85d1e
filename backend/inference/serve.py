"""`sightline inference serve`: our manifests' models served by NVIDIA Triton through PyTriton,
over the Open Inference Protocol (HTTP and gRPC), for GPU nodes and for API replicas that run
SIGHTLINE_VISION_BACKEND=remote. Each model runs the local pool's runtime (runtimes.load) inside
this process; Triton's dynamic batcher batches the requests, configured from the manifest (its
max batch, preferred sizes, queue delay and queue size). The tensors are oip.py's.

PyTriton (`nvidia-pytriton` 0.7.0, requirements-serve.txt) declares numpy<2 while the project
pins numpy 2, so it installs with --no-deps. Measured here: PyTriton itself runs on numpy 2, but
Triton's Python backend stub (a bundled binary that moves each response into Triton) is built
against numpy 1: under numpy 2 every output comes back empty (`binary_data_size: 0`, no
error). So the stub runs in an environment of its own, `stub_env`: a virtualenv holding only
numpy 1.26 that sees this environment's packages through a `.pth` file (`stub_environment`
makes it once, with pip). The stub also links libpython: Python's library directory must be on
LD_LIBRARY_PATH, or it loads the system's libpython and fails; `serve` puts it there."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import venv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.inference import oip, runtimes
from backend.inference.manifest import ManifestError, ModelManifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeAddress:
    host: str  # every endpoint binds here (loopback unless the node is meant to be reached)
    http_port: int
    grpc_port: int
    metrics_port: int


def library_path() -> str:
    """LD_LIBRARY_PATH with Python's library directory first (PyTriton's stub needs it)."""
    libdir = str(sysconfig.get_config_var("LIBDIR") or "")
    current = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    return os.pathsep.join([libdir, *(p for p in current if p != libdir)])


STUB_NUMPY = "numpy==1.26.4"  # the numpy Triton's Python backend stub (0.7.0) was built for


def stub_environment(path: Path) -> Path:
    """The Python environment of Triton's Python backend stub at `path`, made when missing: a
    virtualenv (this interpreter) with numpy 1 of its own and, through a `.pth` file, this
    environment's packages behind it (PyTriton's proxy, pyzmq)."""
    site = (
        path / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    )
    if not (site / "numpy").is_dir():
        log.info("making the Triton stub's environment at %s (%s)", path, STUB_NUMPY)
        venv.EnvBuilder(with_pip=False, clear=True, symlinks=True).create(path)
        done = subprocess.run(  # noqa: S603 - this interpreter's pip, a fixed requirement
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
             STUB_NUMPY],
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise ManifestError(
                f"cannot make the Triton stub's environment at {path}: pip install {STUB_NUMPY} "
                f"failed: {done.stderr.strip()[-2000:]}"
            )
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    pth = site / "sightline-serve.pth"
    wanted = "\n".join(ours) + "\n"
    # Written only when it differs: an image builds the environment once, and its pods (another
    # user, a read-only root filesystem) find it complete and write nothing.
    if not pth.is_file() or pth.read_text(encoding="utf-8") != wanted:
        pth.write_text(wanted, encoding="utf-8")
    return path


# The longest path a Unix socket can bind (sun_path is 108 bytes on Linux, NUL included).
SOCKET_PATH_MAX = 107
PID_DIGITS = 7  # Linux's pid_max is at most 4194304


def workspace_root(root: Path, models: Sequence[str]) -> Path:
    """`root`, or a short directory under the system's temporary one when `root` is too deep
    for the Unix sockets PyTriton makes in a workspace (per model: `<name>-data.sock`,
    `<name>_0_0-server.sock`). Found in CI: a data directory 60 characters deep made a model's
    data socket fail to bind ("AF_UNIX path too long"), which Triton reported only as the
    model being UNAVAILABLE. Any process gets the same answer (a pid is at most 7 digits)."""
    longest = max(
        (len(f"/{PID_DIGITS * '0'}/{name}_0_0-server.sock") for name in models), default=0
    )
    if len(str(root.absolute())) + longest <= SOCKET_PATH_MAX:
        return root
    short = Path(tempfile.gettempdir()) / "sightline-triton"
    if len(str(short)) + longest > SOCKET_PATH_MAX:
        raise ManifestError(f"a model name too long for PyTriton's sockets: {', '.join(models)}")
    log.info("PyTriton's workspaces go to %s: %s is too deep for its sockets", short, root)
    return short


def workspace(root: Path) -> Path:
    """This process's PyTriton workspace under `root` (a copy of the Triton server, sockets,
    the model store), named by its pid. PyTriton removes its own on a clean stop; one left by a
    killed server (about 20 MB) is removed here when its process is gone."""
    root.mkdir(parents=True, exist_ok=True)
    for left in root.iterdir():
        if left.name.isdigit() and not _alive(int(left.name)):
            shutil.rmtree(left, ignore_errors=True)
    return root / str(os.getpid())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def servable(manifests: Sequence[ModelManifest], names: Sequence[str] = ()) -> list[ModelManifest]:
    """The manifests to serve: `names` (each must exist and have a protocol form), else every
    one with a protocol form."""
    if not names:
        return [m for m in manifests if oip.served(m)]
    by_name = {m.name: m for m in manifests}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ManifestError(f"no manifest named {', '.join(missing)} (have {sorted(by_name)})")
    chosen = [by_name[n] for n in names]
    for manifest in chosen:
        oip.signature(manifest)  # raises for a task without a protocol form
    return chosen


def infer_function(manifest: ModelManifest, run: runtimes.BatchFn) -> Callable[[list[Any]], Any]:
    """PyTriton's callable for one model: the requests of a batch Triton formed, each of one or
    more items, run as one batch of the runtime; one response per request."""

    def infer(requests: list[Any]) -> list[dict[str, Any]]:
        per_request = [oip.request_items(manifest, dict(request.data)) for request in requests]
        outputs = run([item for items in per_request for item in items])
        responses = []
        start = 0
        for items in per_request:
            responses.append(oip.response_arrays(manifest, outputs[start : start + len(items)]))
            start += len(items)
        return responses

    return infer


def serve(
    manifests: Sequence[ModelManifest],
    address: ServeAddress,
    *,
    stub_env: Path,
    workspaces: Path,
    device: str = "auto",
    threads: int = 1,
) -> None:
    """Loads each model (its weights checked against the manifest), binds it to Triton and
    serves until SIGINT or SIGTERM."""
    os.environ["LD_LIBRARY_PATH"] = library_path()
    # Kubernetes and Docker stop a container with SIGTERM, on which Python ends at once: the
    # requests in flight dropped, the workspace left behind. As SIGINT, PyTriton stops Triton
    # (which finishes what it runs, up to exit_timeout_secs) and removes its workspace.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy
    from pytriton.model_config import Tensor as TritonTensor
    from pytriton.server import triton_server
    from pytriton.triton import Triton, TritonConfig

    # PyTriton runs the stub in this process's environment (sys.exec_prefix): ours has numpy 2
    stub = stub_environment(stub_env)
    triton_server.get_triton_python_backend_python_env = lambda: stub

    config = TritonConfig(
        http_address=address.host,
        http_port=address.http_port,
        grpc_address=address.host,
        grpc_port=address.grpc_port,
        metrics_address=address.host,
        metrics_port=address.metrics_port,
        exit_timeout_secs=5,
    )
    root = workspace_root(workspaces, [m.name for m in manifests])
    with Triton(config=config, workspace=workspace(root)) as triton:
        for manifest in manifests:
            tensors = oip.signature(manifest)
            run = runtimes.load(manifest, device, threads)
            triton.bind(
                model_name=manifest.name,
                infer_func=infer_function(manifest, run),
                inputs=[
                    TritonTensor(name=t.name, dtype=t.dtype, shape=t.shape) for t in tensors.inputs
                ],
                outputs=[
                    TritonTensor(name=t.name, dtype=t.dtype, shape=t.shape) for t in tensors.outputs
                ],
                config=ModelConfig(
                    max_batch_size=manifest.max_batch,
                    batcher=DynamicBatcher(
                        max_queue_delay_microseconds=round(manifest.max_delay_ms * 1000),
                        preferred_batch_size=list(manifest.preferred_batch) or None,
                        # beyond the manifest's queue, Triton refuses (the client: OVERLOADED)
                        default_queue_policy=QueuePolicy(max_queue_size=manifest.max_queue),
                        # live frames first, as in the local pool (oip.PRIORITY)
                        priority_levels=len(oip.PRIORITY),
                        default_priority_level=max(oip.PRIORITY.values()),
                    ),
                ),
                strict=True,
            )
            log.info(
                "serving %s@%s (max batch %d, queue delay %.1f ms)",
                manifest.name,
                manifest.version,
                manifest.max_batch,
                manifest.max_delay_ms,
            )
        triton.serve()
