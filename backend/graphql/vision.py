"""Image analysis in the schema: `analyzeImage` (multipart upload) starts a job,
`visionJobEvents` streams each task's result as it completes, `visionJob` reads the stored job,
`visionModels` lists what the inference pool serves."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from datetime import datetime
from typing import Annotated, Any

import strawberry
from strawberry.file_uploads import Upload
from strawberry.scalars import JSON
from strawberry.types import Info

from backend.auth.scopes import Scope
from backend.core import models
from backend.errors import ServiceUnavailable
from backend.graphql.context import Context
from backend.graphql.ids import parse_id
from backend.graphql.permissions import HasScope, until_credential_ends
from backend.graphql.uploads import read_upload
from backend.realtime.eventlog import RunEvent as LoggedEvent
from backend.vision.service import VisionService
from backend.vision.service import VisionTask as Task

VISION = [HasScope(Scope.VISION)]

VisionTask = strawberry.enum(Task, name="VisionTask")
VisionStatus = strawberry.enum(models.VisionStatus, name="VisionStatus")


def _service(info: Info[Context, None]) -> VisionService:
    service = info.context.services.vision
    if service is None:
        raise ServiceUnavailable("this app was built without services")
    return service


@strawberry.type(name="VisionJob")
class VisionJobType:
    id: strawberry.ID
    status: VisionStatus  # type: ignore[valid-type]
    tasks: list[str]
    media_type: str
    width: int
    height: int
    size_bytes: int
    sha256: str
    results: JSON = strawberry.field(
        description="Per task: `model`, `version`, `ms`, `cost` (money: the compute-seconds at "
        "the version's price) and `result`, or `error` {code, message}."
    )
    error_code: str | None
    error: str | None
    created_at: datetime

    @classmethod
    def of(cls, job: models.VisionJob) -> VisionJobType:
        return cls(
            id=strawberry.ID(str(job.id)),
            status=models.VisionStatus(job.status),
            tasks=list(job.tasks),
            media_type=job.media_type,
            width=job.width,
            height=job.height,
            size_bytes=job.size_bytes,
            sha256=job.sha256,
            results=job.results,
            error_code=job.error_code,
            error=job.error,
            created_at=job.created_at,
        )


@strawberry.type(description="A model the inference pool serves, and whether it is warm.")
class VisionModel:
    name: str
    version: str
    task: str
    runtime: str
    status: str = strawberry.field(
        description="`loading` (its weights load and it runs once on a worker: not served "
        "yet), `ready`, `failed` (not served; `error` says why: weights missing or not "
        "matching their sha256, a load or warm-up run that raised), or `draining` (retired: "
        "it finishes what it has queued or running, then unloads)."
    )
    error: str | None
    batches: int
    items: int
    default: bool = strawberry.field(
        default=True,
        description="Whether a request that names no version (and no policy routes) gets "
        "this version here; other versions are served by pin (`name@version`) or policy.",
    )


@strawberry.interface(description="An event of a vision job; `cursor` resumes after it.")
class VisionJobEvent:
    cursor: str


@strawberry.type
class VisionJobQueued(VisionJobEvent):
    tasks: list[str]


@strawberry.type(
    description="The server running the job stopped; another one runs it again from its stored "
    "image: `tasks` are those with no result yet (the others' results were streamed already)."
)
class VisionJobResumed(VisionJobEvent):
    tasks: list[str]


@strawberry.type(description="One task's result, as soon as it is ready.")
class VisionTaskCompleted(VisionJobEvent):
    task: str
    model: str
    version: str
    ms: float
    result: JSON


@strawberry.type
class VisionTaskFailed(VisionJobEvent):
    task: str
    code: str
    message: str


@strawberry.type
class VisionJobCompleted(VisionJobEvent):
    failed_tasks: int


@strawberry.type
class VisionJobFailed(VisionJobEvent):
    code: str
    message: str


VISION_EVENT_TYPES = (
    VisionJobQueued,
    VisionJobResumed,
    VisionTaskCompleted,
    VisionTaskFailed,
    VisionJobCompleted,
    VisionJobFailed,
)

_EVENTS: dict[str, Callable[[str, dict[str, Any]], VisionJobEvent]] = {
    "VisionJobQueued": lambda c, d: VisionJobQueued(cursor=c, tasks=list(d.get("tasks", []))),
    "VisionJobResumed": lambda c, d: VisionJobResumed(cursor=c, tasks=list(d.get("tasks", []))),
    "VisionTaskCompleted": lambda c, d: VisionTaskCompleted(
        cursor=c,
        task=str(d["task"]),
        model=str(d["model"]),
        version=str(d["version"]),
        ms=float(d["ms"]),
        result=d["result"],
    ),
    "VisionTaskFailed": lambda c, d: VisionTaskFailed(
        cursor=c, task=str(d["task"]), code=str(d["code"]), message=str(d["message"])
    ),
    "VisionJobCompleted": lambda c, d: VisionJobCompleted(
        cursor=c, failed_tasks=int(d.get("failedTasks", 0))
    ),
}


def _event(event: LoggedEvent) -> VisionJobEvent:
    build = _EVENTS.get(event.type)
    if build is not None:
        return build(event.cursor, event.data)
    return VisionJobFailed(
        cursor=event.cursor,
        code=str(event.data.get("code", "INTERNAL_SERVER_ERROR")),
        message=str(event.data.get("message", "")),
    )


@strawberry.type
class VisionQuery:
    @strawberry.field(
        permission_classes=VISION,
        description="One of the caller's vision jobs (anyone else's is NOT_FOUND, for tenant "
        "admins too).",
    )
    async def vision_job(self, info: Info[Context, None], id: strawberry.ID) -> VisionJobType:
        job = await _service(info).job(info.context.require_principal(), parse_id(id, "id"))
        return VisionJobType.of(job)

    @strawberry.field(permission_classes=VISION)
    async def vision_models(self, info: Info[Context, None]) -> list[VisionModel]:
        pool = info.context.services.inference
        if pool is None:
            return []
        return [
            VisionModel(
                name=name,
                version=version,
                task=state.manifest.task.value,
                runtime=state.manifest.runtime,
                status=state.status.value,
                error=state.error,
                batches=state.batches,
                items=state.items,
                default=pool.default_version(name) == version,
            )
            for (name, version), state in sorted(pool.versions().items())
        ]


@strawberry.type
class VisionMutation:
    @strawberry.mutation(
        permission_classes=VISION,
        description="Starts the analysis of an image (multipart upload); follow "
        "visionJobEvents(id). Refused at once: unsupported or lying formats, too many bytes or "
        "pixels, unknown models or versions, images the tenant's image rail blocks "
        "(IMAGE_BLOCKED). `classifier`, `detector` and `ocrEngine` may pin a version "
        "(`\"name@version\"`); otherwise the model's traffic policy picks it, and each task's "
        "result records the version that served.",
    )
    async def analyze_image(
        self,
        info: Info[Context, None],
        *,
        image: Upload,
        tasks: list[VisionTask],  # type: ignore[valid-type]
        classifier: str | None = None,
        detector: str | None = None,
        ocr_engine: Annotated[
            str | None,
            strawberry.argument(
                description="OCR: `tesseract` or an OCR model the inference pool serves "
                "(`rapidocr`), optionally pinned to a version (`name@version`; the registry's "
                "versions of `tesseract` may run RapidOCR); default: SIGHTLINE_VISION_OCR_ENGINE."
            ),
        ] = None,
        language: str = "eng",
        top_k: int = 5,
        min_score: Annotated[
            float | None,
            strawberry.argument(
                description="Detection: the score (0..1) a box needs "
                "(default: SIGHTLINE_VISION_DETECT_MIN_SCORE)."
            ),
        ] = None,
        max_detections: Annotated[
            int | None,
            strawberry.argument(
                description="Detection: the most boxes per image "
                "(default and limit: SIGHTLINE_VISION_DETECT_MAX_DETECTIONS)."
            ),
        ] = None,
    ) -> VisionJobType:
        service = _service(info)
        limit = info.context.state.settings.vision.max_image_bytes
        data = await read_upload(image, limit + 1)
        job = await service.analyze(
            info.context.require_principal(),
            data,
            [Task(t) for t in tasks],
            classifier=classifier,
            detector=detector,
            ocr_engine=ocr_engine,
            language=language,
            top_k=top_k,
            min_score=min_score,
            max_detections=max_detections,
        )
        return VisionJobType.of(job)


@strawberry.type
class VisionSubscription:
    @strawberry.subscription(
        permission_classes=VISION,
        description="One of the caller's jobs: its events from after `after` (from the start "
        "when null), then live.",
    )
    async def vision_job_events(
        self, info: Info[Context, None], id: strawberry.ID, after: str | None = None
    ) -> AsyncGenerator[VisionJobEvent, None]:
        events = await _service(info).job_events(
            info.context.require_principal(), parse_id(id, "id"), after
        )
        async for event in until_credential_ends(info.context, events):
            yield _event(event)
