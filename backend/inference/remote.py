"""Models served by a remote inference service over the Open Inference Protocol (KServe v2):
NVIDIA Triton, KServe, or our own `sightline inference serve`. The InferenceClient the API uses
with SIGHTLINE_VISION_BACKEND=remote, in place of the local pool; no torch loads here.

Calls go through tritonclient's asyncio client, HTTP or gRPC (`protocol`; gRPC needs
`tritonclient[grpc]`, from requirements-serve.txt), one request per item (the server's dynamic
batcher batches them, also across API replicas). Each call has its own timeout; a call that
fails on the way (connection refused or dropped, timed out, the server busy) is retried, model
calls being idempotent; consecutive failures open a circuit breaker, and calls then fail at once
with INFERENCE_UNAVAILABLE until a trial call succeeds. A model serves once the server's
model-ready endpoint says so and its metadata (tensor names, datatypes, shapes) matches its
manifest (oip.check); a mismatch keeps it from serving (MODEL_SIGNATURE_MISMATCH)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from backend.inference import oip
from backend.inference.client import (
    InferenceError,
    ModelState,
    ModelStatus,
    ModelUnavailable,
    Overloaded,
    Priority,
    ServiceUnavailable,
)
from backend.inference.manifest import ModelManifest

log = logging.getLogger(__name__)

Key = tuple[str, str]
# Statuses of a server that cannot take the call now (busy, starting, stopping, or not reached
# over gRPC): retried. HTTP codes, and gRPC's as tritonclient names them.
_RETRY_STATUSES = {
    "429",
    "502",
    "503",
    "504",
    "StatusCode.UNAVAILABLE",
    "StatusCode.DEADLINE_EXCEEDED",
    "StatusCode.RESOURCE_EXHAUSTED",
}
PROTOCOLS = ("http", "grpc")


class CircuitBreaker:
    """Closed until `failures` calls in a row fail; open (every call refused) for `reset_s`;
    then half-open: one trial call at a time, whose success closes it again."""

    def __init__(
        self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._limit = failures
        self._reset_s = reset_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def open(self) -> bool:
        return self._opened_at is not None

    def allow(self) -> bool:
        if self._opened_at is None:
            return True
        if self._trial or self._clock() - self._opened_at < self._reset_s:
            return False
        self._trial = True
        return True

    def succeeded(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._trial = False

    def failed(self) -> None:
        self._failures += 1
        if self._trial or self._failures >= self._limit:
            self._opened_at = self._clock()
        self._trial = False


class RemoteInference:
    """The models of `manifests`, each served by the inference service at `url` (host:port, no
    scheme) under its manifest's name; the server's version policy picks the version."""

    def __init__(
        self,
        manifests: Sequence[ModelManifest],
        url: str,
        *,
        call_timeout_s: float = 10.0,
        retries: int = 2,
        retry_backoff_s: float = 0.2,
        breaker_failures: int = 5,
        breaker_reset_s: float = 5.0,
        ready_poll_s: float = 1.0,
        protocol: str = "http",
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
        self._protocol = protocol
        self._url = url.removeprefix("http://").removeprefix("grpc://")
        self._call_timeout_s = call_timeout_s
        self._retries = retries
        self._backoff_s = retry_backoff_s
        self._ready_poll_s = ready_poll_s
        self._breaker = CircuitBreaker(breaker_failures, breaker_reset_s)
        self._states: dict[Key, ModelState] = {}
        self._defaults: dict[str, str] = {}
        self._failures: dict[Key, InferenceError] = {}
        for manifest in manifests:
            if oip.served(manifest):
                key = (manifest.name, manifest.version)
                self._states[key] = ModelState(manifest)
                self._defaults.setdefault(manifest.name, manifest.version)
        self._client: Any = None
        self._watches: list[asyncio.Task[None]] = []

    @property
    def url(self) -> str:
        return self._url

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    async def start(self) -> None:
        """Opens the connection pool and starts watching each model's readiness (owned tasks,
        cancelled by close)."""
        if self._protocol == "grpc":
            try:
                from tritonclient.grpc.aio import InferenceServerClient as GrpcClient
            except ImportError as exc:
                raise ServiceUnavailable(
                    "remote inference over gRPC needs tritonclient[grpc] "
                    f"(pip install -r requirements-serve.txt): {exc}"
                ) from None
            self._client = GrpcClient(self._url)
        else:
            from tritonclient.http.aio import InferenceServerClient

            self._client = InferenceServerClient(self._url, conn_timeout=self._call_timeout_s)
        for key in self._states:
            task = asyncio.create_task(self._watch(key), name=f"remote-ready:{key[0]}")
            self._watches.append(task)

    async def close(self, grace_s: float = 5.0) -> None:
        for task in self._watches:
            task.cancel()
        await asyncio.gather(*self._watches, return_exceptions=True)
        self._watches.clear()
        if self._client is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await self._client.close()
            self._client = None

    async def _watch(self, key: Key) -> None:
        """Polls the model-ready endpoint until the model is ready, then checks its metadata:
        it serves, or fails for good with the mismatch."""
        from tritonclient.utils import InferenceServerException

        state = self._states[key]
        name = state.manifest.name
        while True:
            try:
                if await self._client.is_model_ready(name):
                    metadata = await self._metadata(name)
                    break
            except (OSError, TimeoutError, InferenceServerException) as exc:
                log.debug("inference service at %s: %s not ready: %s", self._url, name, exc)
            except Exception as exc:  # aiohttp's (connection refused, dropped), or a bug
                if not _transport_error(exc):
                    log.exception("inference service at %s: checking %s failed", self._url, name)
            await asyncio.sleep(self._ready_poll_s)
        try:
            oip.check(state.manifest, metadata)
        except ModelUnavailable as exc:
            log.error("%s", exc)
            self._failures[key] = exc
            state.status, state.error = ModelStatus.FAILED, str(exc)
        else:
            state.status = ModelStatus.READY
        state.ready.set()

    async def _metadata(self, name: str) -> dict[str, Any]:
        """The model's metadata as the HTTP endpoint gives it (gRPC's, as JSON: the same
        fields; its shapes are strings, which oip.check reads as numbers)."""
        if self._protocol == "grpc":
            return dict(await self._client.get_model_metadata(name, as_json=True))
        return dict(await self._client.get_model_metadata(name))

    async def warmed(self, model: str) -> None:
        """Waits until the service serves `model` (default version); raises if it never will."""
        key = (model, self._defaults.get(model, ""))
        state = self._states.get(key)
        if state is None:
            raise ModelUnavailable(f"no model named {model!r}")
        await state.ready.wait()
        if state.status is ModelStatus.FAILED:
            raise self._failures.get(key) or ModelUnavailable(state.error or model)

    def status(self) -> dict[str, ModelState]:
        """Each model's default version's state."""
        return {name: self._states[(name, version)] for name, version in self._defaults.items()}

    def default_version(self, model: str) -> str | None:
        return self._defaults.get(model)

    def versions(self) -> dict[Key, ModelState]:
        return dict(self._states)

    def manifest(self, model: str, version: str | None = None) -> ModelManifest:
        state = self._states.get((model, version or self._defaults.get(model, "")))
        if state is None:
            known = sorted(v for n, v in self._states if n == model)
            if known:
                raise ModelUnavailable(f"{model} has no version {version!r} (it has {known})")
            raise ModelUnavailable(f"no model named {model!r}")
        return state.manifest

    def manifests(self) -> list[ModelManifest]:
        return [state.manifest for state in self._states.values()]

    async def infer(
        self,
        model: str,
        inputs: Sequence[Any],
        *,
        version: str | None = None,
        priority: Priority = Priority.BATCH,
        timeout_s: float | None = None,
    ) -> list[Any]:
        """One output per input. Raises ModelUnavailable (not ready, or SignatureMismatch),
        Overloaded (beyond the model's queue on the server: not retried), ServiceUnavailable
        (the service did not answer after the retries, or the circuit is open),
        InferenceError (the server refused the call), or TimeoutError after `timeout_s`. The
        priority goes with each request (live frames first where the model has priority
        levels, as `sightline inference serve` configures them)."""
        manifest = self.manifest(model, version)
        key = (manifest.name, manifest.version)
        state = self._states[key]
        if state.status is ModelStatus.FAILED:
            raise self._failures.get(key) or ModelUnavailable(state.error or model)
        if state.status is not ModelStatus.READY or self._client is None:
            raise ModelUnavailable(f"{model} is not ready on the inference service at {self._url}")
        calls = [
            asyncio.ensure_future(self._call(manifest, item, oip.PRIORITY[priority]))
            for item in inputs
        ]
        try:
            async with asyncio.timeout(timeout_s):
                outputs = list(await asyncio.gather(*calls))
        finally:
            for call in calls:
                call.cancel()
        state.items += len(outputs)
        return outputs

    def _request(self, manifest: ModelManifest, item: Any) -> tuple[list[Any], list[Any]]:
        """The call's input tensors (binary) and requested outputs, in the protocol's types."""
        tensors = oip.signature(manifest)
        arrays = oip.request_arrays(manifest, item)
        datatypes = {t.name: t.datatype for t in tensors.inputs}
        inputs: list[Any] = []
        if self._protocol == "grpc":
            from tritonclient import grpc

            for name, array in arrays.items():
                tensor = grpc.InferInput(name, list(array.shape), datatypes[name])
                inputs.append(tensor.set_data_from_numpy(array))
            return inputs, [grpc.InferRequestedOutput(t.name) for t in tensors.outputs]
        from tritonclient import http

        for name, array in arrays.items():
            tensor = http.InferInput(name, list(array.shape), datatypes[name])
            inputs.append(tensor.set_data_from_numpy(array, binary_data=True))
        return inputs, [
            http.InferRequestedOutput(t.name, binary_data=True) for t in tensors.outputs
        ]

    async def _call(self, manifest: ModelManifest, item: Any, priority: int) -> Any:
        from tritonclient.utils import InferenceServerException

        tensors = oip.signature(manifest)
        inputs, outputs = self._request(manifest, item)
        # gRPC: each call's own deadline (HTTP: the connection's timeout, set on the client)
        deadline = {"client_timeout": self._call_timeout_s} if self._protocol == "grpc" else {}
        attempt = 0
        while True:
            if not self._breaker.allow():
                raise ServiceUnavailable(
                    f"the inference service at {self._url} is failing: calls are held back "
                    "for a while (circuit open)"
                )
            try:
                result = await self._client.infer(
                    manifest.name, inputs, outputs=outputs, priority=priority, **deadline
                )
            except InferenceServerException as exc:
                if _overloaded(exc) or str(exc.status()) not in _RETRY_STATUSES:
                    self._breaker.succeeded()  # the server answered: the call is at fault
                    raise _refused(manifest, exc) from None
                failure: BaseException = exc
            except (OSError, TimeoutError) as exc:
                failure = exc
            except Exception as exc:
                if not _transport_error(exc):
                    raise
                failure = exc
            else:
                self._breaker.succeeded()
                return oip.response_output(
                    manifest, {t.name: result.as_numpy(t.name) for t in tensors.outputs}
                )
            self._breaker.failed()
            if attempt >= self._retries:
                raise ServiceUnavailable(
                    f"the inference service at {self._url} did not answer for {manifest.name} "
                    f"({attempt + 1} tries): {type(failure).__name__}: {failure}"
                ) from failure
            await asyncio.sleep(self._backoff_s * 2**attempt)
            attempt += 1


def _transport_error(exc: BaseException) -> bool:
    """aiohttp's client errors (connection refused, reset, server disconnected)."""
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - tritonclient[http] brings it
        return False
    return isinstance(exc, aiohttp.ClientError)


def _overloaded(exc: Any) -> bool:
    """Triton's answer to a request beyond the model's queue (`max_queue_size`)."""
    return "exceeds maximum queue size" in str(exc.message()).lower()


def _refused(manifest: ModelManifest, exc: Any) -> InferenceError:
    message = f"the inference service refused {manifest.name}: {exc.message()}"
    if _overloaded(exc):
        return Overloaded(message)
    if "unknown model" in message or "not ready" in message or "unavailable" in message:
        return ModelUnavailable(message)
    return InferenceError(message)
