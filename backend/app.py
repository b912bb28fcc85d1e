"""Builds the FastAPI app: routes, middleware, error handlers; the lifespan owns every client."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from opentelemetry.sdk.trace import SpanProcessor
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from backend import __version__
from backend.agents.checkpoint import RedisCheckpointSaver
from backend.agents.graph import Agent
from backend.agents.guards import Guards
from backend.agents.models import ModelRegistry, alias_specs
from backend.agents.runs import RunService
from backend.agents.tools import AgentTools, ImageAnalysis
from backend.auth.endpoints import oauth_router
from backend.auth.oidc import OIDCLogin
from backend.auth.principal import Principal
from backend.auth.service import AuthService
from backend.auth.signing import TokenSigner
from backend.config import Environment, Settings
from backend.conversations.service import ConversationService
from backend.core.asgi import BodySizeLimitMiddleware, ObservabilityMiddleware
from backend.core.db import Database
from backend.core.metrics import Metrics
from backend.core.migrations import current_revisions, schema_state
from backend.core.redis import ping_redis
from backend.core.state import AppState
from backend.core.telemetry import build_tracer_provider, configure_logging
from backend.core.warmup import Warmth, WarmUp
from backend.errors import AppError, ValidationFailed, expected_error
from backend.graphql import evolution as schema_evolution
from backend.graphql.router import GRAPHIQL_ASSETS, GRAPHIQL_URL, graphql_router
from backend.graphql.schema import SCHEMA_FILE, schema_sdl
from backend.guardrails.engines import build_guardrails
from backend.guardrails.service import GuardrailService
from backend.inference.manifest import load_manifests
from backend.inference.pool import InferencePool
from backend.inference.remote import RemoteInference
from backend.knowledge.embeddings import Embedder, OpenAIEmbedder, build_embedder
from backend.knowledge.service import EmbeddingSpent, KnowledgeService
from backend.knowledge.versions import EmbeddingVersions
from backend.lifecycle.operations import ModelOperations
from backend.lifecycle.policy import Arm, split_pin
from backend.lifecycle.reconcile import PoolReconciler
from backend.lifecycle.router import ModelRouter
from backend.lifecycle.seeding import FIRST_VERSION, served_models
from backend.lifecycle.service import ModelRegistryService
from backend.lifecycle.watcher import RegistryWatcher
from backend.limits.budgets import Budgets, Resource
from backend.limits.pricing import REMOTE, ComputePricing
from backend.limits.ratelimit import RateLimiter
from backend.limits.usage import UsageLedger, UsagePart
from backend.openai_api.router import openai_router
from backend.openai_api.service import OpenAIService
from backend.privacy.endpoints import privacy_router
from backend.privacy.service import PrivacyService, Streams
from backend.privacy.tasks import PurgeScheduler
from backend.realtime.eventlog import RunEventLog
from backend.services import Services
from backend.vision.endpoints import router as live_frames_router
from backend.vision.ocr import OcrEngine
from backend.vision.service import VisionService
from backend.web import STATIC as WEB_STATIC

__all__ = ["SCHEMA_FILE", "build_signer", "create_app", "schema_evolution", "schema_sdl"]

log = logging.getLogger(__name__)

READINESS_TIMEOUT_S = 2.0
INITIAL_PASSWORD_FILE = "initial-admin-password"  # noqa: S105 (a file name)


def build_signer(settings: Settings) -> TokenSigner:
    return TokenSigner(
        secret_key=settings.security.secret_key.get_secret_value(),
        issuer=settings.auth.issuer,
        audience=settings.auth.audience,
        access_ttl_s=settings.auth.access_token_ttl_s,
        clock_skew_s=settings.auth.clock_skew_s,
        grace_s=settings.auth.signing_key_grace_s + settings.auth.access_token_ttl_s,
    )


async def build_services(
    state: AppState,
    *,
    tools: AgentTools | None = None,
    guards: Guards | None = None,
    embedder: Embedder | None = None,
) -> Services:
    settings = state.settings
    signer = build_signer(settings)
    async with state.db.session() as session:
        await signer.load(session)
    auth = AuthService(state.db, signer, state.redis, state.keys, settings.auth)
    if state.embedded_database or settings.auth.bootstrap_admin_password:
        await bootstrap_first_admin(auth, settings)
    oidc = OIDCLogin(settings.auth, state.redis, state.keys) if settings.auth.oidc_issuer else None
    chat = settings.chat
    models = await ModelRegistry.from_settings(chat)
    limiter = RateLimiter(state.redis, state.keys, settings.limits)
    budgets = Budgets(state.redis, state.keys, settings.limits, state.metrics)
    shared_embedder = embedder or build_embedder(settings.knowledge)
    knowledge = KnowledgeService(
        db=state.db,
        redis=state.redis,
        keys=state.keys,
        embedder=shared_embedder,
        limiter=limiter,
        settings=settings.knowledge,
        own_embedder=embedder is None,
        budgets=budgets,
    )
    guardrails: GuardrailService | None = None
    if guards is None and settings.guardrails.enabled:
        guardrails = build_guardrails(
            state.db,
            settings.guardrails,
            embedder=shared_embedder,
            judges=lambda alias: functools.partial(models.complete, alias),
            metrics=state.metrics,
        )
        guards = guardrails
    inference, vision = await _build_vision(state, limiter, budgets, guardrails)
    if inference is not None:  # vision on: images and scanned PDFs can be ingested
        knowledge.read_image = vision.read_text
    registry, models_watcher, reconciler = await _build_registry(
        state,
        auth,
        pool=inference,
        vision=vision,
        chat=models,
        embedder=shared_embedder,
        embeddings=knowledge.versions,
        guardrails=guardrails,
    )
    # the knowledge base's embedding version: the registry's live one once its vectors are in
    await knowledge.versions.start()
    if tools is None:
        tools = AgentTools(
            search_knowledge=knowledge.search_knowledge,
            has_knowledge=knowledge.has_documents,
            is_relevant=knowledge.is_relevant,
            similarity=knowledge.similarities,
            analyze_image=_image_tool(vision, guardrails),
        )
    agent = Agent(
        checkpointer=RedisCheckpointSaver(
            state.redis, state.keys.child("agent"), ttl_s=chat.memory_ttl_s
        ),
        settings=chat,
        tools=tools,
        guards=guards,
        tracer=state.tracer_provider.get_tracer("sightline.chat"),
    )
    conversations = ConversationService(state.db)
    run_events = RunEventLog(
        state.redis,
        state.keys,
        ttl_after_end_s=chat.events_ttl_s,
        on_lag=state.metrics.stream_lag.observe,
    )
    privacy = PrivacyService(
        db=state.db,
        redis=state.redis,
        keys=state.keys,
        settings=settings.privacy,
        secret=settings.security.secret_key.get_secret_value(),
        auth=auth,
        streams=Streams(runs=run_events, ingestion=knowledge.events, vision=vision.events),
        memory=agent.checkpointer,  # type: ignore[arg-type]
        redactor=guardrails.redact_for_storage if guardrails is not None else None,
    )
    runs = RunService(
        db=state.db,
        redis=state.redis,
        keys=state.keys,
        events=run_events,
        conversations=conversations,
        limiter=limiter,
        budgets=budgets,
        models=models,
        agent=agent,
        settings=chat,
        metrics=state.metrics,
        stored_text=privacy.stored_message,
        tracer=state.tracer_provider.get_tracer("sightline.chat"),
    )
    privacy.stop_run = runs.stop
    await runs.start()
    await auth.start()
    purges = PurgeScheduler(privacy, state.redis, state.keys, settings.privacy)
    purges.start()
    lifecycle = ModelOperations(
        state.redis,
        state.keys,
        settings.lifecycle,
        state.metrics,
        drift=settings.drift,
        db=state.db,
    )
    lifecycle.start()
    runs.served = lifecycle.stats.record  # every run's version, outcome, latency and cost
    vision.operations = lifecycle  # every task's version figures; shadows of sampled requests
    runs.drift = lifecycle.drift  # each turn's drift samples (None: drift off)
    # each search's drift samples; sampled searches again on a shadow embedding version
    knowledge.drift, knowledge.mirror = lifecycle.drift, lifecycle.mirror
    ledger = UsageLedger(
        state.db,
        flush_s=settings.cost.usage_flush_s,
        timeout_s=settings.cost.usage_flush_timeout_s,
    )
    ledger.start()
    knowledge.embedded = embedded = _embedding_spent(
        settings=settings,
        metrics=state.metrics,
        serving=lambda: knowledge.embedder,
        lifecycle=lifecycle,
        budgets=budgets,
        registry=models_watcher,
        ledger=ledger,
    )
    knowledge.versions.spent = functools.partial(_reembedded, embedded)
    _operate_models(lifecycle, registry, models_watcher, guardrails)
    state.metrics.on_error = lifecycle.errors.record  # errors by code over time, too
    knowledge.start()  # renews job leases, takes over the jobs of replicas that died
    vision.start()  # the same for vision jobs (taken over only where vision is on)
    warm_up = _warm_up(settings, shared_embedder, guardrails, vision, inference)
    return Services(
        auth=auth,
        conversations=conversations,
        limiter=limiter,
        budgets=budgets,
        runs=runs,
        knowledge=knowledge,
        oidc=oidc,
        guardrails=guardrails,
        vision=vision,
        inference=inference,
        privacy=privacy,
        purges=purges,
        lifecycle=lifecycle,
        openai=OpenAIService(
            models=models,
            guards=agent.guards,
            limiter=limiter,
            budgets=budgets,
            db=state.db,
            embedder=lambda: knowledge.embedder,
            chat=chat,
            settings=settings.openai,
            tools=tools,
            runs=runs,
            served=lifecycle.stats.record,
            metrics=state.metrics,
            embedded=embedded,
            drift=lifecycle.drift,
        ),
        ledger=ledger,
        grace_s=settings.server.graceful_shutdown_s,
        warm_up=warm_up,
        registry=registry,
        models_watcher=models_watcher,
        reconciler=reconciler,
    )


def _operate_models(
    lifecycle: ModelOperations,
    registry: ModelRegistryService,
    watcher: RegistryWatcher,
    guardrails: GuardrailService | None,
) -> None:
    """The model operations follow the registry: canary guards that roll back and ramp through
    it, the timeline's version events, drift references that restart on promotion, and the
    traffic gauges on every change. The guardrails' learned head records its versions' figures
    and runs their shadows there too."""
    if guardrails is not None:
        guardrails.operations = lifecycle
    lifecycle.use_registry(
        watcher,
        rollback=functools.partial(_canary_rollback, registry),
        ramp=functools.partial(_canary_ramp, registry),
    )
    lifecycle.use_history(lambda: watcher.snapshot, registry.version_events)
    registry.on_promoted = lifecycle.promoted
    watcher.add_listener(lifecycle.routed)


async def _canary_rollback(registry: ModelRegistryService, model: str, reason: str) -> None:
    """The canary guard's rollback: the policy before the canary's, audited as the system's."""
    await registry.rollback_model(None, model, reason=f"canary guard: {reason}")


async def _canary_ramp(
    registry: ModelRegistryService, model: str, version: str, percent: float
) -> None:
    """The canary guard's next ramp step: the canary gets `percent`, live the rest; at 100 the
    canary is promoted."""
    if percent >= 100:
        await registry.promote_version(None, model, version)
        return
    snapshot = await registry.snapshot()
    policy = snapshot.policies.get(model)
    if policy is None:
        return
    arms = [Arm(version, percent)] + [
        Arm(arm.version, 100 - percent) for arm in policy.arms if arm.version == policy.live
    ]
    await registry.set_traffic_policy(
        None, model, arms, expected_revision=policy.revision, reason="canary guard: ramp"
    )


async def _build_registry(
    state: AppState,
    auth: AuthService,
    *,
    pool: InferencePool | RemoteInference | None,
    vision: VisionService,
    chat: ModelRegistry,
    embedder: Embedder,
    embeddings: EmbeddingVersions,
    guardrails: GuardrailService | None,
) -> tuple[ModelRegistryService, RegistryWatcher, PoolReconciler | None]:
    """The model registry, seeded with what this server serves (unless the registry has it),
    and this replica's watcher on it, started: it has read the registry once. Its listeners
    (vision's router, then the pool's reconciler, which loads new versions and drains retired
    ones) get every registry state from the first on."""
    settings = state.settings
    registry = ModelRegistryService(
        db=state.db,
        redis=state.redis,
        keys=state.keys,
        settings=settings.lifecycle,
        auth=auth,
        operator_tenant=settings.privacy.operator_tenant,
    )
    if settings.lifecycle.seed:
        served = {m.alias for m in chat.aliases}
        specs = {a: s for a, s in alias_specs(settings.chat).items() if a in served}
        manifests = [s.manifest for s in pool.status().values()] if pool is not None else []
        manifests += vision.in_process_models()  # Tesseract: its version here
        embedding = (embedder.name, embedder.dimensions, settings.knowledge.embedding_base_url)
        heads = [guardrails.heads.packaged] if guardrails is not None else []
        await registry.seed(served_models(manifests, specs, embedding, heads))
    watcher = RegistryWatcher(registry, state.redis, settings.lifecycle)
    # chat: versions built from each registry state (before routing may pick them), then routed
    chat.router = ModelRouter(chat.is_ready, chat.local_versions)
    watcher.add_listener(chat.apply)
    watcher.add_listener(chat.router)
    watcher.add_listener(embeddings.registry_changed)  # a promoted version is re-embedded
    if guardrails is not None:  # the learned head's versions, built from each state, then routed
        guardrails.router = ModelRouter(guardrails.heads.is_ready, guardrails.heads.local_versions)
        watcher.add_listener(guardrails.heads)
        watcher.add_listener(guardrails.router)
    reconciler = None
    if pool is not None and vision.router is not None:
        watcher.add_listener(vision.router)
    if isinstance(pool, InferencePool) and vision.router is not None:
        # a remote service loads its own versions: only a local pool follows the registry
        reconciler = PoolReconciler(
            pool,
            lambda _replica, model, version, ok, error: watcher.report(model, version, ok, error),
            replica_id=watcher.replica_id,
            load_timeout_s=settings.vision.version_load_timeout_s,
            drain_s=settings.vision.version_drain_s,
        )
        watcher.add_listener(reconciler)
    await watcher.start()
    return registry, watcher, reconciler


def _warm_up(
    settings: Settings,
    embedder: Embedder,
    guardrails: GuardrailService | None,
    vision: VisionService,
    pool: InferencePool | RemoteInference | None,
) -> WarmUp | None:
    """Every default model loads and runs once now, in the background: the server answers
    health checks meanwhile, and `/readyz` says what is still warming."""
    if not settings.server.warm_up:
        return None
    warm_up = WarmUp(settings.server.warm_up_timeout_s)
    warm_up.start(embedder.name, lambda: embedder.embed(["warm up"]))
    steps = dict(guardrails.warm_ups()) if guardrails is not None else {}
    steps.update(vision.warm_ups())
    for name, step in steps.items():
        warm_up.start(name, step)
    if pool is not None:  # its models load in its workers already: watched, not started
        for model in pool.status():
            warm_up.start(model, functools.partial(pool.warmed, model))
    return warm_up


def _image_tool(vision: VisionService, guardrails: GuardrailService | None) -> ImageAnalysis:
    """The chat agent's analyze_image: what an attached image shows, its text screened by the
    tenant's PII rail (an image's OCR text reaches the prompt like the user's words)."""

    async def analyze_image(principal: Principal, attachment_id: str) -> dict[str, Any]:
        try:
            job_id = uuid.UUID(attachment_id)
        except ValueError:
            raise ValidationFailed("not an attachment id", field="attachments") from None
        summary = await vision.describe(principal, job_id)
        if guardrails is not None and summary.get("text"):
            summary["text"] = await guardrails.redact(principal, summary["text"], "image")
        return summary

    return analyze_image


async def _reembedded(
    embedded: EmbeddingSpent, tenant_id: uuid.UUID, seconds: float, embedder: Embedder
) -> None:
    """The platform's re-embedding after a promotion: priced and counted, never charged."""
    await embedded(tenant_id, seconds, None, "reembed", embedder)


def _embedding_spent(
    *,
    settings: Settings,
    metrics: Metrics,
    serving: Callable[[], Embedder],
    lifecycle: ModelOperations,
    budgets: Budgets,
    registry: RegistryWatcher,
    ledger: UsageLedger,
) -> EmbeddingSpent:
    """Prices the compute-seconds of an embedding call made for a tenant (the price its
    registry spec names for the embedder's device, else the settings': the CPU for the packaged
    model, `remote` for an endpoint) and counts them in the cost metrics and the version's
    serving figures. A call a principal made on its own (a search, `/v1/embeddings`) is also
    recorded: its usage in the ledger (written by its next flush, no database round trip here),
    its money charged to their budget (one Redis round trip; used up: BUDGET_EXCEEDED). An
    ingestion job records and charges its calls itself (KnowledgeService)."""
    pricing = ComputePricing(settings.cost.compute_second_prices, metrics)

    def own_prices(model: str, version: str) -> dict[str, float] | None:  # no I/O
        for record in registry.snapshot.versions.get(model, ()):
            if record.version == version:
                prices = record.spec.get("compute_second_prices")
                return prices if isinstance(prices, dict) else None
        return None

    async def spent(
        tenant_id: uuid.UUID,
        seconds: float,
        principal: Principal | None,
        subject: str,
        embedder: Embedder | None = None,
    ) -> UsagePart:
        # default: the knowledge base's serving version (it follows promotions)
        embedder = embedder or serving()
        model, found = split_pin(embedder.name)
        version = found or FIRST_VERSION
        device = REMOTE if isinstance(embedder, OpenAIEmbedder) else "cpu"
        part = pricing.embedding(
            tenant_id, model, version, seconds, device, own_prices(model, version)
        )
        cost = part.cost
        lifecycle.stats.record(
            model, version, ok=True, latency_s=seconds, compute_s=seconds, cost=float(cost)
        )
        if principal is None:
            return part
        ledger.add(
            tenant_id=principal.tenant_id,
            user_id=principal.user_id,
            resource=Resource.COMPUTE_SECONDS.value,
            subject=subject,
            part=part,
        )
        if cost > 0:
            await budgets.charge(
                tenant_id=principal.tenant_id,
                user_id=principal.user_id,
                plan=principal.plan,
                resource=Resource.COST,
                amount=float(cost),
                subject=subject,
            )
        return part

    return spent


async def _build_vision(
    state: AppState, limiter: RateLimiter, budgets: Budgets, guardrails: GuardrailService | None
) -> tuple[InferencePool | RemoteInference | None, VisionService]:
    """The inference pool (its models load in the workers, in the background), or with
    SIGHTLINE_VISION_BACKEND=remote the inference service's client (its models serve once the
    service says they are ready), and the vision service on it; the guardrails' image rail
    screens uploads. With vision off there is no pool, and the service still reads stored jobs."""
    settings = state.settings.vision
    pool: InferencePool | RemoteInference | None = None
    if settings.enabled and settings.backend == "remote":
        pool = RemoteInference(
            load_manifests(settings.models_dir),
            settings.remote_url,
            call_timeout_s=settings.remote_call_timeout_s,
            retries=settings.remote_retries,
            breaker_failures=settings.remote_breaker_failures,
            breaker_reset_s=settings.remote_breaker_reset_s,
            protocol=settings.remote_protocol,
        )
        await pool.start()
    elif settings.enabled:
        pool = InferencePool(
            load_manifests(settings.models_dir),
            workers=settings.workers,
            device=settings.device,
            threads=settings.worker_threads(),
            metrics=state.metrics,
            slab_bytes=settings.batch_slab_mb * 2**20,
            in_flight=settings.batches_in_flight,
        )
        await pool.start()

    async def image_rail(principal: Principal, data: bytes) -> str | None:
        assert guardrails is not None
        verdict = await guardrails.check_image(principal, data)
        return verdict.decision.reason if verdict.blocked and verdict.decision else None

    vision = VisionService(
        db=state.db,
        redis=state.redis,
        keys=state.keys,
        inference=pool,
        ocr=OcrEngine(settings.tessdata, settings.ocr_threads),
        limiter=limiter,
        settings=settings,
        image_rail=image_rail if guardrails is not None else None,
        budgets=budgets,
        pricing=ComputePricing(state.settings.cost.compute_second_prices, state.metrics),
        tracer=state.tracer_provider.get_tracer("sightline.vision"),
    )
    return pool, vision


async def bootstrap_first_admin(auth: AuthService, settings: Settings) -> None:
    """The first tenant and admin on a database with none; a generated password is announced."""
    password = await auth.bootstrap_admin()
    if password is not None:
        _announce_first_admin(settings, password)


def _announce_first_admin(settings: Settings, password: str) -> None:
    """The generated password goes to a private file, never into a log line."""
    path = settings.data_dir / INITIAL_PASSWORD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(password + "\n", encoding="utf-8")
    log.warning(
        "first admin created: tenant %r, email %r, password in %s. Sign in: POST /oauth/token "
        "grant_type=password tenant=%s username=%s password=...",
        settings.auth.bootstrap_tenant,
        settings.auth.bootstrap_admin_email,
        path.resolve(),
        settings.auth.bootstrap_tenant,
        settings.auth.bootstrap_admin_email,
    )


def create_app(
    settings: Settings | None = None,
    *,
    db: Database | None = None,
    redis: Redis | None = None,
    span_processors: Sequence[SpanProcessor] = (),
    agent_tools: AgentTools | None = None,
    guards: Guards | None = None,
    embedder: Embedder | None = None,
) -> FastAPI:
    """The ASGI app. `uvicorn --factory backend.app:create_app` reads settings from the env.

    Args:
        db, redis: clients to use instead of opening new ones (tests); the app then does not
            close them and does not migrate.
        span_processors: extra span processors (tests collect spans in memory).
        agent_tools, guards: the chat agent's tools and rails (default: the knowledge base;
            pass-through rails).
        embedder: the knowledge base's embedder (default: from settings; tests share one).
    """
    settings = settings or Settings()
    metrics = Metrics(
        max_operation_names=settings.graphql.max_operation_names,
        max_error_codes=settings.telemetry.metrics_max_error_codes,
    )
    tracer_provider = build_tracer_provider(settings.telemetry, span_processors)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, Any]]:
        configure_logging(settings.telemetry)
        state = await AppState.open(
            settings, metrics=metrics, tracer_provider=tracer_provider, db=db, redis=redis
        )
        try:
            services = await build_services(
                state, tools=agent_tools, guards=guards, embedder=embedder
            )
        except BaseException:
            await state.close()
            raise
        if settings.server.gc_freeze:
            # Everything loaded so far lives as long as the server: the collector's full
            # passes need not scan it (they took ~11% of the CPU of a loaded chat server).
            gc.collect()
            gc.freeze()
        shown = "127.0.0.1" if settings.server.host in ("0.0.0.0", "::") else settings.server.host
        log.info(
            "sightline %s ready (%s): open http://%s:%d/",
            __version__,
            settings.env.value,
            shown,
            settings.server.port,
        )
        try:
            yield {"sightline": state, "services": services}
        finally:
            await services.aclose()
            await state.close()

    app = FastAPI(
        title="Sightline",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.metrics = metrics  # for operators' introspection and tests; not a service locator
    app.include_router(graphql_router(settings))
    app.include_router(
        oauth_router(
            lambda request: request.state.services.auth,
            lambda request: request.state.services.oidc,
        )
    )
    app.include_router(live_frames_router)
    app.include_router(
        openai_router(
            lambda request: request.state.services.openai,
            lambda request: request.state.services.auth,
            settings.server,
            on_error=lambda route, code: metrics.error("openai", code, route),
        )
    )
    app.include_router(
        privacy_router(
            lambda request: request.state.services.privacy,
            lambda request: request.state.services.auth,
        )
    )
    _add_demo(app)
    if settings.graphql.graphiql_enabled(settings.env is Environment.PRODUCTION):
        app.mount(GRAPHIQL_URL, StaticFiles(directory=GRAPHIQL_ASSETS), name="graphiql")
    _add_probes(app, metrics, settings)
    _add_error_handlers(app)

    # Added last = outermost: observability sees 413s and CORS preflights too.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.server.max_body_bytes)
    if settings.server.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.server.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
        )
    app.add_middleware(ObservabilityMiddleware, metrics=metrics, tracer_provider=tracer_provider)
    return app


def _add_demo(app: FastAPI) -> None:
    """The demo page at `/` and its assets (a build that is not there is simply not served)."""
    index = WEB_STATIC / "index.html"
    if not index.exists():
        return
    app.mount("/assets", StaticFiles(directory=WEB_STATIC / "assets"), name="demo-assets")

    @app.get("/", include_in_schema=False)
    async def demo() -> FileResponse:
        return FileResponse(index, headers={"cache-control": "no-cache"})


def _add_probes(app: FastAPI, metrics: Metrics, settings: Settings) -> None:
    @app.get("/healthz", include_in_schema=True, tags=["probes"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"])
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: PostgreSQL and Redis answer, the schema is at the code's migration and
        (unless SIGHTLINE_SERVER_READY_AFTER_WARM_UP is off) no model is still warming up."""
        state: AppState = request.state.sightline
        checks = await asyncio.gather(
            _check(state.db.ping(READINESS_TIMEOUT_S)),
            _check(ping_redis(state.redis, READINESS_TIMEOUT_S)),
            _check(_migrations_current(state)),
        )
        ready = all(value == "ok" for value in checks)
        body = dict(zip(("database", "redis", "migrations"), checks, strict=True))
        warm_up: WarmUp | None = request.state.services.warm_up
        # Names and states only: why a model failed can name files (visionModels and the
        # log say it to those allowed to know).
        models = {n: s.status.value for n, s in (warm_up.states() if warm_up else {}).items()}
        if Warmth.WARMING in models.values():
            body["models"] = "warming"
            ready = ready and not settings.server.ready_after_warm_up
        else:  # a model that failed is not served; the others are: degraded, still ready
            body["models"] = "degraded" if Warmth.FAILED in models.values() else "ok"
        return JSONResponse(
            {"status": "ready" if ready else "not_ready", "checks": body, "models": models},
            status_code=200 if ready else 503,
        )

    if settings.telemetry.metrics_enabled:

        @app.get("/metrics", tags=["probes"])
        async def prometheus_metrics() -> Response:
            """Prometheus text exposition."""
            body, content_type = metrics.exposition()
            return Response(body, media_type=content_type)


async def _migrations_current(state: AppState) -> None:
    """Not ready while the schema is behind the code. A schema ahead of it (the next release's
    migrations ran, as a rolling upgrade does before it replaces the pods) keeps this release
    ready, so the old pods serve on until the new ones are ready instead of all answering 503 at
    once. That holds because a release's migrations keep the previous release working (README,
    "Kubernetes": add first, remove a release later)."""
    async with asyncio.timeout(READINESS_TIMEOUT_S):
        current = await current_revisions(state.db.engine)
    if schema_state(current) == "behind":
        raise RuntimeError("schema is behind the code; run `sightline migrate`")


async def _check(probe: Any) -> str:
    try:
        await probe
    except Exception as exc:  # a probe reports, it never raises
        # The reason names internal addresses: it goes to the log, not to anonymous callers.
        log.warning("readiness check failed: %r", exc)
        return "failed"
    return "ok"


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    response = JSONResponse(
        {"error": {"code": code, "message": message, **extra}}, status_code=status
    )
    retry_after = extra.get("retryAfter")
    if isinstance(retry_after, int | float):
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return response


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def app_error(_: Request, exc: AppError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message, **exc.details)

    async def backing_service_error(_: Request, exc: Exception) -> JSONResponse:
        """PostgreSQL or Redis down: 503 SERVICE_UNAVAILABLE with Retry-After, never the
        driver's message (it names internal addresses)."""
        typed = expected_error(exc)
        if typed is None:
            log.error("unhandled error", exc_info=exc)
            return _error(500, "INTERNAL_SERVER_ERROR", "Internal server error.")
        return _error(typed.status, typed.code, typed.message, **typed.details)

    # Handled here, not by the catch-all below: Starlette re-raises what reaches that one.
    for kind in (RedisError, SQLAlchemyError, OSError):
        app.add_exception_handler(kind, backing_service_error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "BAD_USER_INPUT", "invalid request", details=exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 400: "BAD_REQUEST"}
        response = _error(
            exc.status_code, codes.get(exc.status_code, "HTTP_ERROR"), str(exc.detail)
        )
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return _error(500, "INTERNAL_SERVER_ERROR", "Internal server error.")
