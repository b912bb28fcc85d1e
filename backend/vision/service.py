"""Image analysis: an upload becomes a job whose tasks (OCR, detection, classification) run at
once and stream their results as each completes; results are stored with the model name and
the version that served (routed per request: a pin `name@version`, the tenant's pin, the
registry's sticky split), timings and the requester.

A job holds a lease (backend.core.leases) like an ingestion job. Its image is stored with it
(until it ends), and each task's result is stored as the task completes. When its replica dies,
another replica with vision on (or the same, restarted) takes the job over and runs the tasks
that have no result yet from the stored image, up to `job_max_attempts` starts, then fails it
with WORKER_LOST. The row is always written before the stream's terminal event, and recovery
appends the event a row calls for when its stream lacks it: the two end in agreement. The
compute-seconds a job holds on its requester's budget are recorded under the job's id, so that
whichever replica ends the job settles them, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, TypeVar

import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode, Tracer
from redis.asyncio import Redis

from backend.auth.principal import Principal
from backend.config import VisionSettings
from backend.core.db import Database
from backend.core.leases import Work, job_leases
from backend.core.models import VisionJob, VisionStatus
from backend.core.redis import KeySpace
from backend.core.retry import is_transient, retrying
from backend.core.tasks import drain
from backend.core.telemetry import MODEL, MODEL_VERSION, TENANT, record_span
from backend.errors import AppError, NotFound, ServiceUnavailable, ValidationFailed
from backend.inference.catalog import Task
from backend.inference.client import (
    ITEM_TIMINGS,
    InferenceClient,
    InferenceError,
    ItemTiming,
    Priority,
)
from backend.inference.manifest import ModelManifest
from backend.lifecycle.operations import ModelOperations
from backend.lifecycle.policy import RequestKey, split_pin
from backend.lifecycle.router import ModelRouter, run_routed
from backend.lifecycle.shadow import compare_vision
from backend.limits.budgets import BudgetExceeded, Budgets, Reservation, Resource, UsagePart
from backend.limits.pricing import ComputePricing, device_of
from backend.limits.ratelimit import RateLimiter
from backend.realtime.eventlog import RunEvent, RunEventLog
from backend.vision import repository as jobs
from backend.vision.images import DecodeBudget, DecodedImage, decode
from backend.vision.ocr import TESSERACT, OcrEngine, OcrUnavailable
from backend.vision.preprocess import classification_input, detector_input, ocr_input

log = logging.getLogger(__name__)

WORKER_LOST = "WORKER_LOST"
T = TypeVar("T")


class VisionTask(StrEnum):
    OCR = "ocr"
    DETECT = "detect"
    CLASSIFY = "classify"


# the model task and request argument of each vision task
_MODEL_TASKS = {
    VisionTask.CLASSIFY: (Task.CLASSIFICATION, "classifier"),
    VisionTask.DETECT: (Task.DETECTION, "detector"),
    VisionTask.OCR: (Task.OCR, "ocrEngine"),
}


@dataclass(frozen=True)
class _Options:
    """What a job was asked besides its tasks (stored with its image)."""

    models: dict[VisionTask, str]
    language: str
    top_k: int
    min_score: float
    max_detections: int

    def stored(self) -> dict[str, Any]:
        models = {task.value: name for task, name in self.models.items()}
        return {
            "models": models,
            "language": self.language,
            "topK": self.top_k,
            "minScore": self.min_score,
            "maxDetections": self.max_detections,
        }

    @classmethod
    def of(cls, stored: dict[str, Any], settings: VisionSettings) -> _Options:
        models = {VisionTask(k): str(v) for k, v in dict(stored.get("models") or {}).items()}
        models.setdefault(VisionTask.CLASSIFY, settings.classifier)
        models.setdefault(VisionTask.DETECT, settings.detector)
        models.setdefault(VisionTask.OCR, settings.ocr_engine)
        min_score = stored.get("minScore")
        most = stored.get("maxDetections")
        return cls(
            models,
            str(stored.get("language") or "eng"),
            int(stored.get("topK") or 5),
            settings.detect_min_score if min_score is None else float(min_score),
            settings.detect_max_detections if most is None else int(most),
        )


@dataclass
class _Job:
    """A job as its runner needs it (the same whichever replica runs it)."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    created_by: uuid.UUID | None
    tasks: list[VisionTask]
    options: _Options
    data: bytes
    reservation: Reservation | None
    # the cost budget: holds nothing, charged at the end; recorded under the job's key, like
    # `reservation` (a retried charge counts once; a replica that recovers the job charges it)
    money: Reservation | None = None
    image: DecodedImage | None = None  # decoded when accepted; from `data` when taken over
    results: dict[str, Any] = field(default_factory=dict)  # stored, per task
    span: Span | None = None  # its `vision.job` span, from acceptance (none: taken over)

    @property
    def key(self) -> str:
        return str(self.id)

    @property
    def member(self) -> str:
        return Work(self.tenant_id, self.id, self.created_by).member

    def pending(self) -> list[VisionTask]:
        return [t for t in self.tasks if t.value not in self.results]


@dataclass(frozen=True)
class _Ending:
    """How a job ends: its status, and for a failure its code and message."""

    status: VisionStatus
    code: str | None = None
    message: str | None = None

    @classmethod
    def of(cls, tasks: Sequence[str], results: dict[str, Any]) -> _Ending:
        """Completed unless every task failed (then the first failure's code)."""
        failed = [results[t]["error"] for t in tasks if "error" in results.get(t, {})]
        if tasks and len(failed) == len(tasks):
            return cls(VisionStatus.FAILED, str(failed[0]["code"]), "every task failed")
        return cls(VisionStatus.COMPLETED)

    def event(self, results: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The terminal event of a job that ends so."""
        if self.status is VisionStatus.FAILED:
            return "VisionJobFailed", {"code": self.code, "message": self.message or ""}
        failed = sum(1 for r in results.values() if "error" in r)
        return "VisionJobCompleted", {"failedTasks": failed}


@dataclass(frozen=True)
class _Over:
    """A job that is over, as recovery found it (or ended it): what its stream must hold."""

    tasks: list[VisionTask]
    results: dict[str, Any]
    event: tuple[str, dict[str, Any]]  # the terminal event its row calls for


class _EndedElsewhere(Exception):
    """The job's row ended meanwhile (another replica took the job over and ended it)."""


class ImageBlocked(AppError):
    code = "IMAGE_BLOCKED"
    status = 422


# principal, image bytes -> a reason to refuse the image, or None (the guardrails' image rail)
ImageRail = Callable[[Principal, bytes], Awaitable[str | None]]


class VisionService:
    def __init__(
        self,
        *,
        db: Database,
        redis: Redis,
        keys: KeySpace,
        inference: InferenceClient | None,
        ocr: OcrEngine,
        limiter: RateLimiter,
        settings: VisionSettings,
        image_rail: ImageRail | None = None,
        budgets: Budgets | None = None,
        router: ModelRouter | None = None,
        pricing: ComputePricing | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._db = db
        self._tracer = tracer or trace.NoOpTracer()
        self._keys = keys.child("vision")
        self.events = RunEventLog(redis, self._keys, ttl_after_end_s=settings.jobs_ttl_s)
        self._inference = inference
        # Tesseract: a version of the registry's `tesseract` model that this process serves
        self._tesseract = ocr.manifest()
        # which version serves each request (without a registry: each model's default here)
        self._router = router or (
            ModelRouter.over(inference, [(m.name, m.version) for m in self.in_process_models()])
            if inference is not None
            else None
        )
        # per-version serving figures and shadow runs (the app sets it; None: not kept)
        self.operations: ModelOperations | None = None
        self._ocr = ocr
        self._limiter = limiter
        self._settings = settings
        self._image_rail = image_rail
        self._budgets = budgets
        self._pricing = pricing or ComputePricing({})
        self._device = device_of(settings.device)  # what a compute-second is priced as
        self._slots = asyncio.Semaphore(settings.max_concurrent_jobs)
        self._jobs: dict[uuid.UUID, asyncio.Task[None]] = {}
        # A few threads decode every image: costly images queue here rather than taking every
        # core from the inference workers.
        self._decoder = ThreadPoolExecutor(
            settings.decode_threads, thread_name_prefix="sightline-decode"
        )
        self._leases = job_leases(
            redis,
            self._keys("job-leases"),
            settings,
            tasks=self._jobs,
            on_lost=self._recover_lost,
            find_unleased=self._unleased,
            name="vision",
        )
        self._closing = False

    @property
    def models(self) -> InferenceClient:
        if self._inference is None:
            raise ServiceUnavailable("vision is off on this server (SIGHTLINE_VISION_ENABLED)")
        return self._inference

    @property
    def enabled(self) -> bool:
        """Whether this replica runs vision jobs (it has an inference pool)."""
        return self._inference is not None

    def in_process_models(self) -> list[ModelManifest]:
        """The model versions this process serves itself, not the inference pool (Tesseract):
        registry entries like the pool's (seeded at start), none with vision off."""
        if self._inference is None or self._tesseract is None:
            return []
        return [self._tesseract]

    def _in_process(self, model: str, version: str | None) -> bool:
        """Whether this process serves `model` at `version` (None: its default) itself."""
        own = self._tesseract
        return own is not None and model == own.name and version in (None, own.version)

    def ocr_languages(self) -> list[str]:
        """The installed Tesseract languages (none: OCR tasks fail with OCR_UNAVAILABLE)."""
        return self._ocr.languages()

    def warm_ups(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """The models this service runs in-process, by name: each loaded and run once at
        startup (the inference pool warms its own)."""
        return {"tesseract": self._ocr.warm} if self._inference is not None else {}

    def start(self) -> None:
        """Starts renewing this replica's job leases and, with vision on, taking over the jobs
        of replicas that died (a replica with vision off runs no job: it leaves them to one
        that can run them)."""
        self._leases.start(claim=self._inference is not None)

    async def close(self, grace_s: float) -> None:
        """Lets jobs finish for `grace_s`, then stops them: their leases expire, so a replica
        (another, or this one restarted) takes them over."""
        self._closing = True
        await drain(self._jobs.values(), grace_s)
        await self._leases.close(grace_s)
        self._ocr.close()
        self._decoder.shutdown(wait=False, cancel_futures=True)

    async def _decode(
        self,
        data: bytes,
        *,
        max_bytes: int,
        max_pixels: int,
        animated: str,
        budget: DecodeBudget | None = None,
    ) -> DecodedImage:
        """`decode` in the decode threads; the CPU time it took is charged to `budget`."""

        def run() -> DecodedImage:
            if budget is not None:
                budget.started()
            started = time.thread_time()
            try:
                return decode(data, max_bytes=max_bytes, max_pixels=max_pixels, animated=animated)
            finally:
                if budget is not None:
                    budget.spend(time.thread_time() - started)

        # A cancelled wait cancels a decode that has not started; one that has runs to its end
        # (and is charged), holding its thread: the number of threads bounds the work.
        return await asyncio.get_running_loop().run_in_executor(self._decoder, run)

    def _decode_upload(self, data: bytes) -> Awaitable[DecodedImage]:
        return self._decode(
            data,
            max_bytes=self._settings.max_image_bytes,
            max_pixels=self._settings.max_pixels,
            animated=self._settings.animated,
        )

    # -- jobs --------------------------------------------------------------------------------

    async def analyze(
        self,
        principal: Principal,
        data: bytes,
        tasks: Sequence[VisionTask],
        *,
        classifier: str | None = None,
        detector: str | None = None,
        ocr_engine: str | None = None,
        language: str = "eng",
        top_k: int = 5,
        min_score: float | None = None,
        max_detections: int | None = None,
    ) -> VisionJob:
        """Validates the image and starts its job; bad input is refused before anything runs.

        The image is stored with the job (in the transaction that accepts it), so whichever
        replica runs the job to its end, an accepted image is never lost. Its `vision.job`
        span starts here (a child of the request's) and ends with the job."""
        span = self._tracer.start_span("vision.job")
        if span.is_recording():
            span.set_attribute(TENANT, str(principal.tenant_id))
        try:
            with trace.use_span(span, end_on_exit=False):
                with self._tracer.start_as_current_span("vision.validate"):
                    image, wanted, options = await self._validate(
                        principal,
                        data,
                        tasks,
                        classifier=classifier,
                        detector=detector,
                        ocr_engine=ocr_engine,
                        language=language,
                        top_k=top_k,
                        min_score=min_score,
                        max_detections=max_detections,
                    )
                job, row = await self._admit(principal, data, image, wanted, options)
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            span.end()
            raise
        job.span = span  # the job's from here: its runner ends it
        try:
            await self._event(job.key, "VisionJobQueued", {"tasks": row.tasks})
        finally:  # accepted: it runs (and ends, releasing its lease) whatever became of that
            self._start(job)
        return row

    async def _validate(
        self,
        principal: Principal,
        data: bytes,
        tasks: Sequence[VisionTask],
        *,
        classifier: str | None,
        detector: str | None,
        ocr_engine: str | None,
        language: str,
        top_k: int,
        min_score: float | None,
        max_detections: int | None,
    ) -> tuple[DecodedImage, list[VisionTask], _Options]:
        """A job's input checked and decoded, its image screened, the caller's rate spent."""
        self.models  # noqa: B018 (vision off: ServiceUnavailable before anything else)
        wanted = list(dict.fromkeys(tasks))
        if not wanted:
            raise ValidationFailed("give at least one task", field="tasks")
        if not 1 <= top_k <= 50:
            raise ValidationFailed("topK must be between 1 and 50", field="topK")
        min_score, max_detections = self._detection_limits(min_score, max_detections)
        models = {
            VisionTask.CLASSIFY: classifier or self._settings.classifier,
            VisionTask.DETECT: detector or self._settings.detector,
            VisionTask.OCR: ocr_engine or self._settings.ocr_engine,
        }
        for task, name in models.items():
            if task in wanted:
                self._check_model(task, name)
        image = await self._decode_upload(data)
        if self._image_rail is not None:
            reason = await self._image_rail(principal, data)
            if reason is not None:
                raise ImageBlocked(f"the image was refused: {reason}")
        await self._limiter.enforce(principal.subject, principal.plan, "vision_job")
        return image, wanted, _Options(models, language, top_k, min_score, max_detections)

    async def _admit(
        self,
        principal: Principal,
        data: bytes,
        image: DecodedImage,
        wanted: list[VisionTask],
        options: _Options,
    ) -> tuple[_Job, VisionJob]:
        """A validated job, stored with its lease and its compute hold (not started)."""
        if self._closing:
            raise ServiceUnavailable("the server is shutting down")
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        job = _Job(
            id=uuid.uuid4(),
            tenant_id=principal.tenant_id,
            created_by=principal.user_id,
            tasks=wanted,
            options=options,
            data=data,
            reservation=None,
            image=image,
        )
        # The lease first: should this replica die from here on, whoever claims the lease
        # finds what there is of the job (its reservation, its row) and ends or resumes it.
        await self._leases.acquire(job.member)
        try:
            if self._budgets is not None:  # compute-seconds: BUDGET_EXCEEDED before anything
                job.reservation = await self._budgets.reserve(
                    tenant_id=principal.tenant_id,
                    user_id=principal.user_id,
                    plan=principal.plan,
                    resource=Resource.COMPUTE_SECONDS,
                    amount=self._settings.compute_hold_s,
                    subject="vision",
                    hold_id=job.key,
                )
                job.money = await self._budgets.admit(
                    tenant_id=principal.tenant_id,
                    user_id=principal.user_id,
                    plan=principal.plan,
                    subject="vision",
                    hold_id=job.key,
                )
            row = await self._create(job, image, digest)
        except BaseException:
            await self._give_up(job)
            raise
        job.data = b""  # stored; this replica runs the job from the decoded image
        return job, row

    def _detection_limits(
        self, min_score: float | None, max_detections: int | None
    ) -> tuple[float, int]:
        """A request's score threshold and maximum of boxes (the settings' when not given)."""
        most = self._settings.detect_max_detections
        if min_score is not None and not 0 <= min_score <= 1:
            raise ValidationFailed("minScore must be between 0 and 1", field="minScore")
        if max_detections is not None and not 1 <= max_detections <= most:
            raise ValidationFailed(
                f"maxDetections must be between 1 and {most}", field="maxDetections"
            )
        return (
            self._settings.detect_min_score if min_score is None else min_score,
            most if max_detections is None else max_detections,
        )

    def _check_model(self, task: VisionTask, name: str) -> None:
        """An unknown model, one for another task, or a pinned version (`name@version`) not
        served here: refused now (BAD_USER_INPUT), naming the models there are for the task
        (for OCR: Tesseract and the pool's OCR models), or the model's versions."""
        wanted, field = _MODEL_TASKS[task]
        model, version = split_pin(name)
        if task is VisionTask.OCR and model == TESSERACT:
            manifest = self._tesseract  # its other versions may be the pool's
        else:
            try:
                manifest = self.models.manifest(model)
            except InferenceError:
                manifest = None
        if manifest is None or manifest.task is not wanted:
            available = sorted({m.name for m in self.models.manifests() if m.task is wanted})
            if task is VisionTask.OCR:
                available = list(dict.fromkeys([TESSERACT, *available]))
            raise ValidationFailed(
                f"no {wanted.value} model named {model!r}; available: "
                + (", ".join(available) or "none"),
                field=field,
                available=available,
            )
        if version is not None:
            versions = self._routes.available(model)
            if version not in versions:
                raise ValidationFailed(
                    f"{model} has no version {version!r}; available: " + ", ".join(versions),
                    field=field,
                    available=versions,
                )

    @property
    def router(self) -> ModelRouter | None:
        """How this replica picks a vision model's version (None with vision off); it follows
        the registry as one of its watcher's listeners."""
        return self._router

    @property
    def _routes(self) -> ModelRouter:
        if self._router is None:
            raise ServiceUnavailable("vision is off on this server (SIGHTLINE_VISION_ENABLED)")
        return self._router

    async def _routed(
        self,
        name: str,
        key: RequestKey,
        run: Callable[[str, str], Awaitable[T]],
        task: VisionTask | None = None,
        image: np.ndarray | None = None,
    ) -> tuple[str, str, T, Decimal]:
        """Runs `run(model, version)` on the version the router picks for this request
        (`name` may pin one: `name@version`); returns the model, the version that served, the
        result and what it cost (its compute-seconds at the version's price, counted for the
        asking tenant). The version's serving figures are recorded, and its drift samples of the
        `image` and the result; where the policy mirrors this request to a shadow version, the
        shadow runs after this returns (its result compared with this one for the `task`,
        never returned nor charged)."""
        model, pinned = split_pin(name)
        started = time.perf_counter()
        try:
            route, result = await run_routed(
                self._routes, model, key, pinned, lambda version: run(model, version)
            )
        except (InferenceError, TimeoutError, OcrUnavailable):  # the version's failures
            if self.operations is not None:  # the version that failed, as the router chose it
                failed = self._routes.route(model, key, pinned).version
                took = time.perf_counter() - started
                self.operations.stats.record(model, failed, ok=False, latency_s=took)
            raise
        took = time.perf_counter() - started
        cost = self._spent(key.tenant_id, model, route.version, took)
        if self.operations is not None:
            self.operations.stats.record(
                model, route.version, ok=True, latency_s=took, compute_s=took, cost=float(cost)
            )
            self._drifted(model, route.version, image, result)
            if route.shadow is not None and task is not None:
                shadow = route.shadow  # after the answer, off its path, never charged
                self.operations.mirror(
                    route,
                    result,
                    took,
                    run=lambda: run(model, shadow),
                    compare=functools.partial(compare_vision, task.value),
                )
        return model, route.version, result, cost

    def _spent(self, tenant: str, model: str, version: str, seconds: float) -> Decimal:
        """What `seconds` of a vision model version cost (its manifest's price, else the
        settings'), counted in the metrics."""
        own = None
        in_process = self._in_process(model, version)
        if not in_process:
            with contextlib.suppress(InferenceError):
                own = self.models.manifest(model, version).compute_second_prices
        device = "cpu" if in_process else self._device  # Tesseract runs on this CPU
        return self._pricing.spent(tenant or "none", model, version, "vision", seconds, device, own)

    def _drifted(self, model: str, version: str, image: np.ndarray | None, result: object) -> None:
        """The drift samples of one served image (drift off: nothing)."""
        drift = self.operations.drift if self.operations is not None else None
        if drift is None:
            return
        if image is not None:
            drift.image(model, version, image)
        if isinstance(result, dict):
            drift.vision_result(model, version, result)

    async def _give_up(self, job: _Job) -> None:
        """A job that could not be accepted: its hold goes back, then its lease. When either
        cannot be undone now, the lease is left to expire: recovery finds no job and gives the
        hold back."""
        try:
            for reservation in (job.reservation, job.money):
                if reservation is not None:
                    await reservation.release()
            await self._leases.release(job.member)
        except Exception as exc:
            log.warning(
                "vision job %s: not accepted; its cleanup is left to recovery: %r", job.id, exc
            )
            self._leases.abandon(job.member)

    async def _create(self, job: _Job, image: DecodedImage, digest: str) -> VisionJob:
        async with self._db.session(job.tenant_id) as session:
            row = VisionJob(
                id=job.id,
                tenant_id=job.tenant_id,
                created_by=job.created_by,
                status=VisionStatus.QUEUED.value,
                tasks=[t.value for t in job.tasks],
                media_type=image.media_type,
                width=image.width,
                height=image.height,
                size_bytes=len(job.data),
                sha256=digest,
                results={},
            )
            await jobs.add_job(session, row, job.data, job.options.stored())
        return row

    def _start(self, job: _Job) -> None:
        self._jobs[job.id] = asyncio.create_task(self._run(job), name=f"vision-{job.id}")

    async def _event(self, key: str, kind: str, body: dict[str, Any]) -> None:
        """A progress event (left out when Redis stays down: the job goes on)."""
        await self.events.append_optional(key, kind, body, within_s=self._settings.outage_retry_s)

    async def _run(self, job: _Job) -> None:
        """Runs a job's tasks that have no result yet, then records its end: in the database
        first, then as the stream's last event. An outage longer than `outage_retry_s`, or a
        shutdown, leaves the job to recovery: its lease expires and a replica (this one,
        restarted, or another) takes it over."""
        span = job.span
        if span is None:  # taken over from a replica that stopped: a trace of its own
            span = job.span = self._tracer.start_span("vision.job", context=otel_context.Context())
            if span.is_recording():
                span.set_attribute(TENANT, str(job.tenant_id))
                span.set_attribute("sightline.vision.resumed", True)
        with trace.use_span(span, end_on_exit=True):
            await self._run_tasks(job)

    async def _run_tasks(self, job: _Job) -> None:
        try:
            async with self._slots, asyncio.timeout(self._settings.job_timeout_s):
                if job.image is None:  # taken over: decoded again from the stored image
                    job.image = await self._decode_upload(job.data)
                await self._retrying(lambda: self._begin(job), f"starting vision job {job.id}")
                await _all([self._task(job, task) for task in job.pending()])
            ending = _Ending.of([t.value for t in job.tasks], job.results)
        except (asyncio.CancelledError, _EndedElsewhere):
            # shutting down, or another replica took the job over: not ended here
            self._leases.abandon(job.member)
            self._jobs.pop(job.id, None)
            return
        except TimeoutError:
            ending = _Ending(VisionStatus.FAILED, "JOB_TIMEOUT", "the job ran out of time")
        except Exception as exc:
            if is_transient(exc):  # down for longer than outage_retry_s: resumed later
                log.warning("vision job %s: left to recovery after an outage: %r", job.id, exc)
                self._leases.abandon(job.member)
                self._jobs.pop(job.id, None)
                return
            if isinstance(exc, AppError):  # its stored image no longer decodes (limits lowered)
                ending = _Ending(VisionStatus.FAILED, exc.code, exc.message)
            else:
                log.exception("vision job %s failed", job.id)
                ending = _Ending(VisionStatus.FAILED, "INTERNAL_SERVER_ERROR", "internal error")
        try:
            await asyncio.shield(self._end(job, ending))
        finally:
            self._jobs.pop(job.id, None)

    async def _begin(self, job: _Job) -> None:
        async with self._db.session(job.tenant_id) as session:
            if not await jobs.begin(session, job.id):
                raise _EndedElsewhere

    async def _end(self, job: _Job, ending: _Ending) -> None:
        """Records a job's end: the compute its tasks took is charged, the row ends (its image
        goes, its hold is settled), then the terminal event, then the lease goes."""
        if job.span is not None and ending.status is VisionStatus.FAILED:
            job.span.set_status(Status(StatusCode.ERROR, ending.code or "FAILED"))
        try:
            if job.reservation is not None:
                await self._charge(job.reservation, job.results, job.money)
            ended = await self._retrying(
                lambda: self._close(job, ending), f"ending vision job {job.id}"
            )
            if ended:
                kind, body = ending.event(job.results)
                await self.events.append_retrying(
                    job.key, kind, body, within_s=self._settings.outage_retry_s
                )
            if ended and self._leases.owns(job.member):
                await self._retrying(lambda: self._leases.release(job.member), "releasing a lease")
            else:  # ended elsewhere: the lease is the replica's that took the job over
                self._leases.abandon(job.member)
        except Exception as exc:
            log.warning("vision job %s: its end is left to recovery: %r", job.id, exc)
            self._leases.abandon(job.member)

    async def _close(self, job: _Job, ending: _Ending) -> bool:
        """One unit of work: the row ends, the image goes and the hold is settled, unless the
        job ended elsewhere (False)."""
        async with self._db.session(job.tenant_id) as session:
            row = await jobs.locked(session, job.id)
            if row is None or row.status not in jobs.GOING:
                return False
            _ended(row, ending)
            await jobs.drop_upload(session, job.id)
            if job.reservation is not None:
                await job.reservation.settle(session, parts=_usage_parts(job.results))
            if job.money is not None:  # its record goes (what it charged stays counted)
                await job.money.release()
        return True

    async def _charge(
        self,
        reservation: Reservation,
        results: dict[str, Any],
        money: Reservation | None = None,
    ) -> None:
        """Charges what the stored tasks took (seconds, summed over tasks) and not charged yet,
        idempotent (the reservation is recorded: a charge names its total); and their cost to
        `money`, in the same round trip."""
        seconds = sum(float(r.get("ms", 0)) for r in results.values()) / 1000
        owed = seconds - reservation.charged
        cost = sum(float(r.get("cost", 0)) for r in results.values())
        charges = [(reservation, owed)] if owed > 1e-9 else []
        if money is not None and cost - money.charged > 1e-9:
            charges.append((money, cost - money.charged))
        if not charges:
            return
        assert self._budgets is not None
        budgets = self._budgets
        with contextlib.suppress(BudgetExceeded):  # the job is done; the next one is refused
            await self._retrying(lambda: budgets.charge_together(charges), "charging a vision job")

    async def _task(self, job: _Job, task: VisionTask) -> None:
        """Runs one task; its result (or its failure) is stored, then streamed."""
        started = time.perf_counter()
        assert job.image is not None
        rgb = job.image.rgb
        options = job.options
        key = job_key(job.tenant_id, job.created_by, job.key)
        name = options.models[task]
        # each input's queue wait and batch, for the trace (kept only while it records)
        timings: list[ItemTiming] | None = (
            [] if job.span is not None and job.span.is_recording() else None
        )
        if timings is not None:
            ITEM_TIMINGS.set(timings)  # in this task's own context (see _all)
        try:
            if task is VisionTask.OCR:
                model, version, result, cost = await self._routed(
                    name,
                    key,
                    lambda m, v: self.read(rgb, m, options.language, version=v),
                    task,
                    rgb,
                )
            elif task is VisionTask.CLASSIFY:
                model, version, result, cost = await self._routed(
                    name,
                    key,
                    lambda m, v: self.classify(rgb, m, options.top_k, version=v),
                    task,
                    rgb,
                )
            else:
                model, version, result, cost = await self._routed(
                    name,
                    key,
                    lambda m, v: self.detect(
                        rgb,
                        m,
                        min_score=options.min_score,
                        max_detections=options.max_detections,
                        version=v,
                    ),
                    task,
                    rgb,
                )
        except (AppError, InferenceError) as exc:
            code = getattr(exc, "code", "INFERENCE_FAILED")
            message = getattr(exc, "message", None) or str(exc)
            await self._store(job, task, {"error": {"code": code, "message": message}})
            await self._event(
                job.key, "VisionTaskFailed", {"task": task.value, "code": code, "message": message}
            )
            return
        except TimeoutError:
            await self._store(
                job, task, {"error": {"code": "TIMEOUT", "message": "model too slow"}}
            )
            await self._event(
                job.key,
                "VisionTaskFailed",
                {"task": task.value, "code": "TIMEOUT", "message": "the model took too long"},
            )
            return
        ms = round((time.perf_counter() - started) * 1000, 1)
        if timings is not None:
            self._trace_inference(job, task, model, version, timings)
        entry = {
            "model": model,
            "version": version,
            "ms": ms,
            "cost": float(cost),
            "result": result,
        }
        await self._store(job, task, entry)
        await self._event(job.key, "VisionTaskCompleted", {"task": task.value, **entry})

    def _trace_inference(
        self, job: _Job, task: VisionTask, model: str, version: str, timings: list[ItemTiming]
    ) -> None:
        """The queue wait and batch run of a task's inputs, as spans of its job (timed by the
        pool: the batch ran in a worker process). A shadow's inputs are not the job's."""
        assert job.span is not None
        attributes = {MODEL: model, MODEL_VERSION: version, "sightline.vision.task": task.value}
        if len(job.tasks) == 1:
            job.span.set_attributes({MODEL: model, MODEL_VERSION: version})
        for timing in timings:
            if (timing.model, timing.version) != (model, version):
                continue
            record_span(
                self._tracer, "inference.queue_wait", timing.enqueued, timing.dispatched, attributes
            )
            record_span(
                self._tracer,
                "inference.batch",
                timing.dispatched,
                timing.done,
                {
                    **attributes,
                    "sightline.inference.batch_size": timing.batch_size,
                    "sightline.inference.compute_ms": round(timing.compute_s * 1000, 3),
                },
            )

    async def _store(self, job: _Job, task: VisionTask, entry: dict[str, Any]) -> None:
        """A task's result goes into the job's row (a replica that takes the job over runs
        only the tasks with none); raises _EndedElsewhere when the job ended meanwhile."""

        async def add() -> bool:
            async with self._db.session(job.tenant_id) as session:
                return await jobs.add_result(session, job.id, task.value, entry)

        if not await self._retrying(add, f"storing a result of vision job {job.id}"):
            raise _EndedElsewhere
        job.results[task.value] = entry

    def _retrying(self, step: Callable[[], Awaitable[T]], what: str) -> Awaitable[T]:
        return retrying(step, within_s=self._settings.outage_retry_s, what=what)

    # -- recovery ------------------------------------------------------------------------------

    async def _unleased(self) -> list[str]:
        """Unfinished jobs untouched for a lease and its grace (lease recovery keeps those that
        have no lease at all: Redis lost their owner's, or they predate job leases)."""
        idle = self._settings.job_lease_s + self._settings.job_lost_grace_s
        return [Work(*row).member for row in await self._db.unfinished("vision", idle)]

    async def _recover_lost(self, member: str) -> bool:
        """A job whose replica stopped renewing its lease: resumed here from its stored image
        (the tasks with no stored result, up to `job_max_attempts` starts), else ended: as its
        stored results say when every task has one, else failed with WORKER_LOST. Its hold is
        settled by whoever ends it; a job that had ended gets the terminal event its row calls
        for, if its stream lacks it. Idempotent."""
        work = Work.of(member)
        key = str(work.id)
        if self._closing:
            self._leases.abandon(member)  # for another replica, or this one restarted
            return False
        reservation = money = None
        if self._budgets is not None:
            budgets = self._budgets
            reservation, money = [
                await self._retrying(
                    lambda resource=resource: budgets.recover(  # type: ignore[misc]
                        tenant_id=work.tenant_id,
                        user_id=work.user_id,
                        resource=resource,
                        hold_id=key,
                    ),
                    "reading a reservation",
                )
                for resource in (Resource.COMPUTE_SECONDS, Resource.COST)
            ]
        taken = await self._retrying(
            lambda: self._take_over(work, reservation, money), f"taking over vision job {key}"
        )
        if isinstance(taken, _Job):
            log.warning("vision job %s resumed after its replica was lost", key)
            await self._stream_results(key, taken.tasks, taken.results)
            pending = [t.value for t in taken.pending()]
            await self._event(key, "VisionJobResumed", {"tasks": pending})
            self._start(taken)  # it releases the lease when it ends
            return False
        if taken is not None:
            last = await self._retrying(lambda: self.events.last(key), "reading a log")
            if last is None or not last.terminal:
                await self._stream_results(key, taken.tasks, taken.results)
                kind, body = taken.event
                await self.events.append_retrying(
                    key, kind, body, within_s=self._settings.outage_retry_s
                )
        return True

    async def _take_over(
        self, work: Work, reservation: Reservation | None, money: Reservation | None
    ) -> _Job | _Over | None:
        """One unit of work: the job to resume (with its reservations), or the job as it ended
        (now, or before: what its replica had not charged is charged here), or None when there
        is no such job (the hold goes back)."""
        async with self._db.session(work.tenant_id) as session:
            row = await jobs.locked(session, work.id)
            if row is None:
                for held in (reservation, money):
                    if held is not None:
                        await held.release()
                return None
            results = dict(row.results or {})
            if row.status in jobs.GOING:
                upload = await jobs.locked_upload(session, work.id)
                pending = [t for t in row.tasks if t not in results]
                attempts = upload.attempts if upload is not None else 0
                if pending and upload is not None and attempts < self._settings.job_max_attempts:
                    upload.attempts += 1
                    row.status = VisionStatus.QUEUED.value
                    return _Job(
                        id=row.id,
                        tenant_id=row.tenant_id,
                        created_by=row.created_by,
                        tasks=[VisionTask(t) for t in row.tasks],
                        options=_Options.of(upload.options, self._settings),
                        data=upload.data,
                        reservation=reservation,
                        money=money,
                        results=results,
                    )
                if pending:
                    times = f" ({attempts} times)" if upload is not None else ""
                    ending = _Ending(
                        VisionStatus.FAILED,
                        WORKER_LOST,
                        "the server running this job stopped" + times,
                    )
                else:  # every task's result was stored before the replica died
                    ending = _Ending.of(row.tasks, results)
                _ended(row, ending)
                await jobs.drop_upload(session, work.id)
            if reservation is not None:
                await self._charge(reservation, results, money)
                await reservation.settle(session, parts=_usage_parts(results))
            if money is not None:
                await money.release()
        tasks = [VisionTask(t) for t in row.tasks]
        if row.status == VisionStatus.FAILED.value:
            failed = ("VisionJobFailed", {"code": row.error_code, "message": row.error or ""})
            return _Over(tasks, results, failed)
        return _Over(tasks, results, _Ending(VisionStatus.COMPLETED).event(results))

    async def _stream_results(
        self, key: str, tasks: Sequence[VisionTask], results: dict[str, Any]
    ) -> None:
        """Streams the stored results whose events were lost with the replica (stored, then
        the replica died before it streamed them): subscribers see every task once."""
        streamed: set[str] = set()
        with contextlib.suppress(AppError):  # no stream at all (or expired): nothing streamed
            async for event in self.events.read(key, follow=False):
                if event.type in ("VisionTaskCompleted", "VisionTaskFailed"):
                    streamed.add(str(event.data.get("task")))
        for task in tasks:
            entry = results.get(task.value)
            if entry is None or task.value in streamed:
                continue
            if "error" in entry:
                await self._event(key, "VisionTaskFailed", {"task": task.value, **entry["error"]})
            else:
                await self._event(key, "VisionTaskCompleted", {"task": task.value, **entry})

    async def read_text(self, data: bytes, language: str = "eng") -> str:
        """The text of an image (a scanned page, a photo of a document), by the OCR pipeline:
        the same validation and clean-up as analysis jobs. Knowledge ingestion reads scans
        with it."""
        image = await self._decode(
            data,
            max_bytes=self._settings.max_image_bytes,
            max_pixels=self._settings.max_pixels,
            animated="first_frame",
        )
        return str((await self._ocr.read(image.rgb, language))["text"])

    async def analyse_frame(
        self,
        data: bytes,
        tasks: Sequence[VisionTask],
        *,
        classifier: str | None = None,
        detector: str | None = None,
        top_k: int = 3,
        budget: DecodeBudget | None = None,
        key: RequestKey | None = None,
        spent: Callable[[UsagePart], None] | None = None,
    ) -> dict[str, Any]:
        """One live camera frame: detection and classification at live priority. Its pixels
        are checked against the live limit from the header, before anything is decoded; the
        decode time is charged to the connection's `budget`. `key` (who asks) routes each
        model to its version; `classifier` and `detector` may pin one (`name@version`).
        `spent` hears what each model version took (seconds and cost: the session's meter)."""
        self.models  # noqa: B018 (vision off: ServiceUnavailable)
        settings = self._settings
        image = await self._decode(
            data,
            max_bytes=settings.live_max_frame_bytes,
            max_pixels=settings.live_max_pixels,
            animated="first_frame",
            budget=budget,
        )
        out: dict[str, Any] = {"width": image.width, "height": image.height}
        key = key or RequestKey(tenant_id="", request_id=uuid.uuid4().hex)
        calls: dict[str, Awaitable[tuple[str, str, dict[str, Any], Decimal]]] = {}
        if VisionTask.DETECT in tasks:
            calls["detections"] = self._routed(
                detector or settings.detector,
                key,
                lambda m, v: self.detect(image.rgb, m, Priority.LIVE, version=v),
                image=image.rgb,
            )
        if VisionTask.CLASSIFY in tasks:
            calls["classification"] = self._routed(
                classifier or settings.classifier,
                key,
                lambda m, v: self.classify(image.rgb, m, top_k, Priority.LIVE, version=v),
                image=image.rgb,
            )
        for name, ((model, version, result, cost), seconds) in zip(
            calls, await asyncio.gather(*map(_timed, calls.values())), strict=True
        ):
            out[name] = result
            if spent is not None:
                spent(UsagePart(model, version, "vision", Decimal(str(round(seconds, 6))), cost))
        return out

    # -- pipelines -----------------------------------------------------------------------------

    async def classify(
        self,
        rgb: np.ndarray,
        model: str,
        top_k: int,
        priority: Priority = Priority.BATCH,
        *,
        version: str | None = None,
    ) -> dict[str, Any]:
        """The likeliest classes, by `version` of `model` (none: its default here)."""
        manifest = self.models.manifest(model, version)
        x = await asyncio.to_thread(classification_input, rgb, manifest.input)
        [logits] = await self.models.infer(
            model,
            [x],
            version=manifest.version,
            priority=priority,
            timeout_s=self._settings.infer_timeout_s,
        )
        scores = np.exp(logits - np.max(logits))
        scores /= scores.sum()
        best = np.argsort(scores)[::-1][:top_k]
        labels = manifest.labels
        return {
            "classes": [
                {
                    "index": int(i),
                    "label": labels[i] if i < len(labels) else str(i),
                    "score": round(float(scores[i]), 5),
                }
                for i in best
            ]
        }

    async def read(
        self,
        rgb: np.ndarray,
        engine: str = TESSERACT,
        language: str = "eng",
        priority: Priority = Priority.BATCH,
        *,
        version: str | None = None,
    ) -> dict[str, Any]:
        """The text of an image with its lines and words (boxes in the image's pixels): by
        Tesseract (threads of this process), or by an OCR model of the inference pool
        (RapidOCR, or a version of `tesseract` that runs RapidOCR), which reads every language
        its model knows (`language` is Tesseract's)."""
        if self._in_process(engine, version):
            return await self._ocr.read(rgb, language)
        manifest = self.models.manifest(engine, version)
        image, scale = await asyncio.to_thread(ocr_input, rgb, manifest.input)
        [found] = await self.models.infer(
            engine,
            [{"image": image}],
            version=manifest.version,
            priority=priority,
            timeout_s=self._settings.infer_timeout_s,
        )
        result = dict(found)
        if scale != 1.0:
            for item in (*result["lines"], *result["words"]):
                item["box"] = {k: round(v * scale) for k, v in item["box"].items()}
        result["language"] = manifest.input.get("language", "multi")
        return result

    async def detect(
        self,
        rgb: np.ndarray,
        model: str,
        priority: Priority = Priority.BATCH,
        *,
        min_score: float | None = None,
        max_detections: int | None = None,
        version: str | None = None,
    ) -> dict[str, Any]:
        """The objects a detector finds, best first: label, score (0..1) and box in the
        image's pixels, by `version` of `model` (none: its default here)."""
        manifest = self.models.manifest(model, version)
        min_score, most = self._detection_limits(min_score, max_detections)
        x = await asyncio.to_thread(detector_input, rgb, manifest.runtime, manifest.input)
        request = {"image": x, "min_score": min_score, "max_detections": most}
        [rows] = await self.models.infer(
            model,
            [request],
            version=manifest.version,
            priority=priority,
            timeout_s=self._settings.infer_timeout_s,
        )
        height, width = rgb.shape[:2]
        labels = manifest.labels
        objects = []
        for class_id, score, x0, y0, x1, y1 in np.asarray(rows, dtype=np.float64).reshape(-1, 6):
            index = int(class_id)
            left, top = round(x0 * width), round(y0 * height)
            objects.append(
                {
                    "label": labels[index] if 0 <= index < len(labels) else str(index),
                    "score": round(float(score), 4),
                    "box": {
                        "x": left,
                        "y": top,
                        "width": round(x1 * width) - left,
                        "height": round(y1 * height) - top,
                    },
                }
            )
        objects.sort(key=lambda o: -o["score"])
        return {"objects": objects[:most]}

    # -- reads ---------------------------------------------------------------------------------

    async def job(self, principal: Principal, job_id: uuid.UUID) -> VisionJob:
        """One of the caller's own jobs. Anyone else's is NOT_FOUND, a tenant admin's
        colleagues' included: the schema promises "the caller's" (as for runs and
        conversations), and an image's results can hold what its text said."""
        job = await self._db.get_owned(principal.tenant_id, VisionJob, job_id, "vision job")
        if job.created_by != principal.user_id:
            raise NotFound("no such vision job", id=str(job_id))
        return job

    async def describe(self, principal: Principal, job_id: uuid.UUID) -> dict[str, Any]:
        """What an analysed image shows, short enough for a prompt: its text, the objects
        found and the likeliest classes (the chat agent's analyze_image)."""
        job = await self.job(principal, job_id)
        if job.status != VisionStatus.COMPLETED.value:
            raise ValidationFailed(f"the image's analysis is {job.status}", field="attachments")
        results = job.results or {}
        summary: dict[str, Any] = {"width": job.width, "height": job.height}
        if text := results.get("ocr", {}).get("result", {}).get("text"):
            summary["text"] = text[:3000]
        if objects := results.get("detect", {}).get("result", {}).get("objects"):
            summary["objects"] = [{"label": o["label"], "box": o["box"]} for o in objects[:20]]
        if classes := results.get("classify", {}).get("result", {}).get("classes"):
            summary["classes"] = [{"label": c["label"], "score": c["score"]} for c in classes[:3]]
        return summary

    async def job_events(
        self, principal: Principal, job_id: uuid.UUID, after: str | None
    ) -> AsyncIterator[RunEvent]:
        await self.job(principal, job_id)  # authorisation: the caller's own job
        return self.events.read(str(job_id), after)


async def _timed(call: Awaitable[T]) -> tuple[T, float]:
    """What `call` returns, and the seconds it took."""
    started = time.perf_counter()
    found = await call
    return found, time.perf_counter() - started


def _usage_parts(results: dict[str, Any]) -> list[UsagePart]:
    """A job's usage per model version: the seconds and the cost of its stored tasks."""
    parts: dict[tuple[str, str], tuple[Decimal, Decimal]] = {}
    for entry in results.values():
        if "ms" not in entry:  # failed: nothing computed is charged
            continue
        key = (str(entry["model"]), str(entry["version"]))
        seconds, cost = parts.get(key, (Decimal(0), Decimal(0)))
        parts[key] = (
            seconds + Decimal(str(entry["ms"])) / 1000,
            cost + Decimal(str(entry.get("cost", 0))),
        )
    return [
        UsagePart(model, version, "vision", seconds, cost)
        for (model, version), (seconds, cost) in sorted(parts.items())
    ]


def job_key(tenant_id: uuid.UUID, user_id: uuid.UUID | None, request_id: str) -> RequestKey:
    """Who asks, as routing hashes it (a sticky policy keeps a user on one version)."""
    return RequestKey(
        tenant_id=str(tenant_id),
        user_id=str(user_id) if user_id is not None else None,
        request_id=request_id,
    )


def _ended(row: VisionJob, ending: _Ending) -> None:
    row.status = ending.status.value
    row.error_code = ending.code
    row.error = ending.message
    row.updated_at = datetime.now(UTC)


async def _all(steps: list[Coroutine[Any, Any, None]]) -> None:
    """Runs the steps at once; the first to fail cancels the others and its error is raised
    (not an ExceptionGroup)."""
    try:
        async with asyncio.TaskGroup() as group:
            for step in steps:
                group.create_task(step)
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
