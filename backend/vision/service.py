"""Image analysis: an upload becomes a job whose tasks (OCR, detection, classification) run at
once and stream their results as each completes; results are stored with the model name and
version, timings and the requester."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from backend.auth.principal import Principal
from backend.config import VisionSettings
from backend.core.db import Database
from backend.core.models import VisionJob, VisionStatus
from backend.core.tasks import drain
from backend.errors import AppError, NotFound, ServiceUnavailable, ValidationFailed
from backend.inference.client import InferenceClient, InferenceError, Priority
from backend.limits.budgets import BudgetExceeded, Budgets, Reservation, Resource
from backend.limits.ratelimit import RateLimiter
from backend.realtime.eventlog import RunEvent, RunEventLog
from backend.vision.images import DecodeBudget, DecodedImage, decode
from backend.vision.ocr import OcrEngine
from backend.vision.preprocess import classification_input, detection_input

log = logging.getLogger(__name__)


class VisionTask(StrEnum):
    OCR = "ocr"
    DETECT = "detect"
    CLASSIFY = "classify"


@dataclass(frozen=True)
class _Plan:
    image: DecodedImage
    tasks: list[VisionTask]
    models: dict[VisionTask, str]
    language: str
    top_k: int


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
        events: RunEventLog,
        inference: InferenceClient | None,
        ocr: OcrEngine,
        limiter: RateLimiter,
        settings: VisionSettings,
        image_rail: ImageRail | None = None,
        budgets: Budgets | None = None,
    ) -> None:
        self._db = db
        self.events = events
        self._inference = inference
        self._ocr = ocr
        self._limiter = limiter
        self._settings = settings
        self._image_rail = image_rail
        self._budgets = budgets
        self._slots = asyncio.Semaphore(settings.max_concurrent_jobs)
        self._jobs: dict[uuid.UUID, asyncio.Task[None]] = {}
        # A few threads decode every image: costly images queue here rather than taking every
        # core from the inference workers.
        self._decoder = ThreadPoolExecutor(
            settings.decode_threads, thread_name_prefix="sightline-decode"
        )

    @property
    def models(self) -> InferenceClient:
        if self._inference is None:
            raise ServiceUnavailable("vision is off on this server (SIGHTLINE_VISION_ENABLED)")
        return self._inference

    async def close(self, grace_s: float) -> None:
        await drain(self._jobs.values(), grace_s)
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

    # -- jobs --------------------------------------------------------------------------------

    async def analyze(
        self,
        principal: Principal,
        data: bytes,
        tasks: Sequence[VisionTask],
        *,
        classifier: str | None = None,
        detector: str | None = None,
        language: str = "eng",
        top_k: int = 5,
    ) -> VisionJob:
        """Validates the image and starts its job; bad input is refused before anything runs."""
        self.models  # noqa: B018 (vision off: ServiceUnavailable before anything else)
        wanted = list(dict.fromkeys(tasks))
        if not wanted:
            raise ValidationFailed("give at least one task", field="tasks")
        if not 1 <= top_k <= 50:
            raise ValidationFailed("topK must be between 1 and 50", field="topK")
        models = {
            VisionTask.CLASSIFY: classifier or self._settings.classifier,
            VisionTask.DETECT: detector or self._settings.detector,
        }
        for task, name in models.items():
            if task in wanted:
                try:
                    self.models.manifest(name)
                except InferenceError as exc:  # an unknown model: refused now, typed
                    field = "classifier" if task is VisionTask.CLASSIFY else "detector"
                    raise ValidationFailed(str(exc), field=field) from exc
        image = await self._decode(
            data,
            max_bytes=self._settings.max_image_bytes,
            max_pixels=self._settings.max_pixels,
            animated=self._settings.animated,
        )
        if self._image_rail is not None:
            reason = await self._image_rail(principal, data)
            if reason is not None:
                raise ImageBlocked(f"the image was refused: {reason}")
        await self._limiter.enforce(principal.subject, principal.plan, "vision_job")
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        reservation = None
        if self._budgets is not None:  # compute-seconds: BUDGET_EXCEEDED before anything runs
            reservation = await self._budgets.reserve(
                tenant_id=principal.tenant_id,
                user_id=principal.user_id,
                plan=principal.plan,
                resource=Resource.COMPUTE_SECONDS,
                amount=self._settings.compute_hold_s,
                subject="vision",
            )
        try:
            job = await self._create(principal, wanted, image, data, digest)
        except BaseException:
            if reservation is not None:
                await reservation.release()
            raise
        await self.events.append(str(job.id), "VisionJobQueued", {"tasks": job.tasks})
        plan = _Plan(image, wanted, models, language, top_k)
        self._jobs[job.id] = asyncio.create_task(
            self._run(principal, job.id, plan, reservation), name=f"vision-{job.id}"
        )
        return job

    async def _create(
        self,
        principal: Principal,
        wanted: list[VisionTask],
        image: DecodedImage,
        data: bytes,
        digest: str,
    ) -> VisionJob:
        async with self._db.session(principal.tenant_id) as session:
            job = VisionJob(
                tenant_id=principal.tenant_id,
                created_by=principal.user_id,
                status=VisionStatus.QUEUED.value,
                tasks=[t.value for t in wanted],
                media_type=image.media_type,
                width=image.width,
                height=image.height,
                size_bytes=len(data),
                sha256=digest,
                results={},
            )
            session.add(job)
            await session.flush()
        return job

    async def _run(
        self,
        principal: Principal,
        job_id: uuid.UUID,
        plan: _Plan,
        reservation: Reservation | None,
    ) -> None:
        key = str(job_id)
        tasks = plan.tasks
        results: dict[str, Any] = {}
        try:
            async with self._slots, asyncio.timeout(self._settings.job_timeout_s):
                await self._update(principal, job_id, status=VisionStatus.RUNNING)
                await asyncio.gather(*(self._task(key, t, plan, results) for t in tasks))
            failed = [r for r in results.values() if "error" in r]
            status = VisionStatus.FAILED if len(failed) == len(tasks) else VisionStatus.COMPLETED
            await self._update(principal, job_id, status=status, results=results)
            if status is VisionStatus.FAILED:
                await self.events.append(
                    key,
                    "VisionJobFailed",
                    {"code": failed[0]["error"]["code"], "message": "every task failed"},
                )
            else:
                await self.events.append(key, "VisionJobCompleted", {"failedTasks": len(failed)})
        except asyncio.CancelledError:
            await asyncio.shield(self._fail(principal, job_id, "SERVER_SHUTDOWN", "shut down"))
        except TimeoutError:
            await self._fail(principal, job_id, "JOB_TIMEOUT", "the job ran out of time")
        except Exception:
            log.exception("vision job %s failed", job_id)
            await self._fail(principal, job_id, "INTERNAL_SERVER_ERROR", "internal error")
        finally:
            self._jobs.pop(job_id, None)
            if reservation is not None:
                await asyncio.shield(self._settle(principal, reservation, results))

    async def _settle(
        self, principal: Principal, reservation: Reservation, results: dict[str, Any]
    ) -> None:
        """Charges the compute the tasks took (seconds, summed over tasks)."""
        seconds = sum(float(r.get("ms", 0)) for r in results.values()) / 1000
        try:
            if seconds:
                await reservation.charge(seconds)
        except BudgetExceeded:
            pass  # the job is done; the next one is refused
        except Exception:
            log.exception("could not charge a vision job's compute")
        try:
            async with self._db.session(principal.tenant_id) as session:
                await reservation.settle(session)
        except Exception:
            log.exception("could not record a vision job's usage")
            await reservation.release()

    async def _task(self, key: str, task: VisionTask, plan: _Plan, results: dict[str, Any]) -> None:
        started = time.perf_counter()
        rgb = plan.image.rgb
        try:
            if task is VisionTask.OCR:
                model, version = "tesseract", self._ocr.version
                result = await self._ocr.read(rgb, plan.language)
            elif task is VisionTask.CLASSIFY:
                model = plan.models[task]
                version = self.models.manifest(model).version
                result = await self.classify(rgb, model, plan.top_k)
            else:
                model = plan.models[task]
                version = self.models.manifest(model).version
                result = await self.detect(rgb, model)
        except (AppError, InferenceError) as exc:
            code = getattr(exc, "code", "INFERENCE_FAILED")
            message = getattr(exc, "message", None) or str(exc)
            results[task.value] = {"error": {"code": code, "message": message}}
            await self.events.append(
                key, "VisionTaskFailed", {"task": task.value, "code": code, "message": message}
            )
            return
        except TimeoutError:
            results[task.value] = {"error": {"code": "TIMEOUT", "message": "model too slow"}}
            await self.events.append(
                key,
                "VisionTaskFailed",
                {"task": task.value, "code": "TIMEOUT", "message": "the model took too long"},
            )
            return
        ms = round((time.perf_counter() - started) * 1000, 1)
        entry = {"model": model, "version": version, "ms": ms, "result": result}
        results[task.value] = entry
        await self.events.append(key, "VisionTaskCompleted", {"task": task.value, **entry})

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
    ) -> dict[str, Any]:
        """One live camera frame: detection and classification at live priority. Its pixels
        are checked against the live limit from the header, before anything is decoded; the
        decode time is charged to the connection's `budget`."""
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
        calls = {}
        if VisionTask.DETECT in tasks:
            calls["detections"] = self.detect(
                image.rgb, detector or settings.detector, Priority.LIVE
            )
        if VisionTask.CLASSIFY in tasks:
            calls["classification"] = self.classify(
                image.rgb, classifier or settings.classifier, top_k, Priority.LIVE
            )
        for name, result in zip(calls, await asyncio.gather(*calls.values()), strict=True):
            out[name] = result
        return out

    # -- pipelines -----------------------------------------------------------------------------

    async def classify(
        self, rgb: np.ndarray, model: str, top_k: int, priority: Priority = Priority.BATCH
    ) -> dict[str, Any]:
        manifest = self.models.manifest(model)
        x = await asyncio.to_thread(classification_input, rgb, manifest.input)
        [logits] = await self.models.infer(
            model, [x], priority=priority, timeout_s=self._settings.infer_timeout_s
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

    async def detect(
        self, rgb: np.ndarray, model: str, priority: Priority = Priority.BATCH
    ) -> dict[str, Any]:
        manifest = self.models.manifest(model)
        x, scale = await asyncio.to_thread(detection_input, rgb, manifest.input)
        [boxes] = await self.models.infer(
            model, [x], priority=priority, timeout_s=self._settings.infer_timeout_s
        )
        label = manifest.labels[0] if manifest.labels else "object"
        return {
            "objects": [
                {
                    "label": label,
                    "score": None,  # cascades give no score
                    "box": {
                        "x": round(float(b[0]) * scale),
                        "y": round(float(b[1]) * scale),
                        "width": round(float(b[2]) * scale),
                        "height": round(float(b[3]) * scale),
                    },
                }
                for b in boxes
            ]
        }

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

    async def _update(self, principal: Principal, job_id: uuid.UUID, **values: Any) -> None:
        await self._db.update_owned(principal.tenant_id, VisionJob, job_id, **values)

    async def _fail(self, principal: Principal, job_id: uuid.UUID, code: str, message: str) -> None:
        try:
            await self._update(
                principal, job_id, status=VisionStatus.FAILED, error_code=code, error=message
            )
        finally:
            await self.events.append(
                str(job_id), "VisionJobFailed", {"code": code, "message": message}
            )
