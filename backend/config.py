"""Settings for every area of Sightline, from SIGHTLINE_* environment variables and secret files."""

from __future__ import annotations

import json
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, SecretStr, TypeAdapter, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

# The one default secret shipped in the code; production refuses to start with it.
DEV_SECRET_KEY = "sightline-development-only-secret"  # noqa: S105


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class EmbeddingRuntime(StrEnum):
    ONNX = "onnx"
    TORCH = "torch"


class LogFormat(StrEnum):
    JSON = "json"
    TEXT = "text"


class _FileSecretsSource(PydanticBaseSettingsSource):
    """Reads `<PREFIX><NAME>_FILE` variables: the value is the path of a file holding the setting.

    The Docker/Kubernetes secrets convention: `SIGHTLINE_DATABASE_URL_FILE=/run/secrets/db`.
    A plain environment variable of the same name wins over the file.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        variable = f"{self.config.get('env_prefix', '')}{field_name}_FILE".upper()
        path = os.environ.get(variable)
        if not path:
            return None, field_name, False
        try:
            return Path(path).read_text(encoding="utf-8").strip(), field_name, False
        except OSError as exc:
            # A named secret file that cannot be read is a deployment error, not a silent default.
            raise ValueError(f"cannot read {variable}={path}: {exc.strerror}") from exc

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(field, name)
            if value is not None:
                values[key] = value
        return values


class _Section(BaseSettings):
    """Base of every settings area: its own env prefix, `_FILE` secrets, unknown keys ignored."""

    model_config = SettingsConfigDict(extra="ignore", env_file=None)
    # One line per setting for the README table; filled by each subclass's field descriptions.
    doc_prefix: ClassVar[str] = "SIGHTLINE_"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileSecretsSource(settings_cls), file_secret_settings)


class ServerSettings(_Section):
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_SERVER_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address `sightline serve` binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port `sightline serve` binds.")
    dashboards_url: str | None = Field(
        None,
        description="Where operators' Grafana dashboards are (`serverInfo.dashboardsUrl`; the "
        "demo page links to it).",
    )
    workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes.")
    max_body_bytes: int = Field(
        10 * 1024 * 1024, ge=1024, description="Largest HTTP request body accepted (413 above)."
    )
    max_ws_message_bytes: int | None = Field(
        None,
        ge=1024,
        description="Largest WebSocket message read (close 1009 above). Unset: twice "
        "SIGHTLINE_VISION_LIVE_MAX_FRAME_BYTES, so that a frame over the frame limit is "
        "answered with a per-frame error instead of a closed socket.",
    )
    max_json_depth: int = Field(
        64,
        ge=2,
        le=500,
        description="Deepest nesting of arrays and objects in JSON a client sends (request "
        "bodies, variables, socket messages); 400 above.",
    )
    max_json_values: int = Field(
        100_000,
        ge=100,
        description="Most values (numbers, strings, arrays, ...) in JSON a client sends; 400 "
        "above (millions of tiny values would cost seconds of parsing).",
    )
    ws_compression: bool = Field(
        False,
        description="permessage-deflate on WebSockets (small token frames gain little; costs CPU).",
    )
    gc_freeze: bool = Field(
        True,
        description="Once started, keep what the server loaded (modules, models: ~480k objects) "
        "out of the garbage collector's full passes, which otherwise scan it all (~180 ms "
        "each, several a minute under load). Off in tests, which build many apps in one process.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins allowed by CORS and for cross-origin WebSockets (JSON list).",
    )
    graceful_shutdown_s: float = Field(
        10.0, gt=0, description="Seconds open connections get to finish on shutdown."
    )
    warm_up: bool = Field(
        True,
        description="Load and run every default model once at startup, in the background (the "
        "embedder, the rails' models, OCR; the inference pool's models warm in any case), so "
        "that no first request pays a load.",
    )
    warm_up_timeout_s: float = Field(
        600.0, gt=0, description="Longest one model's warm-up may take before it counts as failed."
    )
    ready_after_warm_up: bool = Field(
        True,
        description="`/readyz` answers 503 until every model has warmed up (or failed to): a "
        "replica gets traffic only once warm. Off: ready as soon as PostgreSQL and Redis answer.",
    )


class DatabaseSettings(_Section):
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_DATABASE_", extra="ignore")

    url: SecretStr | None = Field(
        None,
        description="PostgreSQL URL (`postgresql+asyncpg://...`). Unset: embedded PostgreSQL.",
    )
    pool_size: int = Field(10, ge=1, description="Connections kept open per process.")
    max_overflow: int = Field(10, ge=0, description="Extra connections allowed under load.")
    pool_timeout_s: float = Field(10.0, gt=0, description="Wait for a free pooled connection.")
    connect_timeout_s: float = Field(
        5.0, gt=0, description="Give up connecting after this long (startup fails fast)."
    )
    statement_timeout_ms: int = Field(
        30_000, ge=0, description="Server-side statement timeout; 0 disables."
    )
    migrate_on_start: bool | None = Field(
        None,
        description="Apply pending migrations at startup. Unset: only on the embedded database.",
    )
    echo: bool = Field(False, description="Log every SQL statement (development only).")
    app_role: str = Field(
        "sightline_app",
        description="Role every transaction runs as (row-level security applies to it); "
        "empty: the login role.",
    )

    @field_validator("url")
    @classmethod
    def _async_driver(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        raw = value.get_secret_value()
        for plain in ("postgresql://", "postgres://"):
            if raw.startswith(plain):
                raw = "postgresql+asyncpg://" + raw[len(plain) :]
        if not raw.startswith("postgresql+asyncpg://"):
            raise ValueError("database url must be a postgresql:// or postgresql+asyncpg:// URL")
        return SecretStr(raw)


class RedisSettings(_Section):
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_REDIS_", extra="ignore")

    url: SecretStr | None = Field(
        None,
        description="Redis URL. Unset: 127.0.0.1:6379 if it answers, else embedded Valkey.",
    )
    key_prefix: str = Field("sl:", description="Prefix of every key Sightline writes.")
    connect_timeout_s: float = Field(2.0, gt=0, description="Give up connecting after this long.")
    socket_timeout_s: float = Field(5.0, gt=0, description="Timeout of one Redis command.")
    max_connections: int = Field(100, ge=1, description="Connection pool size per process.")


class GraphQLSettings(_Section):
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_GRAPHQL_", extra="ignore")

    graphiql: bool | None = Field(
        None,
        description="Serve GraphiQL on GET /graphql to browsers. Unset: on, except in production.",
    )
    introspection: bool | None = Field(
        None, description="Allow schema introspection. Unset: on, except in production."
    )
    max_cost: int = Field(
        5000, ge=1, description="Most fields one document may resolve (page sizes multiply)."
    )
    max_batch_operations: int = Field(
        10, ge=0, description="Operations in one batched HTTP request; 0 disables batching."
    )
    persisted_query_ttl_s: int = Field(
        7 * 86400, ge=60, description="How long an automatic persisted query is kept."
    )
    max_depth: int = Field(12, ge=1, description="Deepest selection set accepted.")
    max_tokens: int = Field(4000, ge=10, description="Most tokens in one GraphQL document.")
    max_aliases: int = Field(30, ge=1, description="Most aliases in one GraphQL document.")
    max_breadth: int = Field(
        100,
        ge=1,
        description="Most fields one selection set may gather, its fragments' fields included.",
    )
    max_merge_comparisons: int = Field(
        100_000,
        ge=1,
        description="Work the field-merging validation rule may do on one document (graphql-core"
        " units; its own default is 500,000).",
    )
    validation_timeout_s: float = Field(
        2.0,
        gt=0,
        description="CPU seconds one document may take to validate (off the loop); then refused.",
    )
    max_subscriptions_per_connection: int = Field(
        100, ge=1, description="Concurrent subscriptions on one WebSocket."
    )
    connection_init_timeout_s: float = Field(
        10.0, gt=0, description="Close a WebSocket that sends no connection_init in time (4408)."
    )
    keepalive_interval_s: float = Field(
        15.0, gt=0, description="Ping interval on graphql-ws/graphql-transport-ws sockets."
    )
    heartbeat_min_interval_ms: int = Field(
        100, ge=0, description="Shortest `heartbeat(intervalMs)` a client may ask for."
    )
    heartbeat_max_interval_ms: int = Field(
        60_000, ge=1, description="Longest `heartbeat(intervalMs)` a client may ask for."
    )

    def introspection_enabled(self, production: bool) -> bool:
        return self.introspection if self.introspection is not None else not production

    def graphiql_enabled(self, production: bool) -> bool:
        return self.graphiql if self.graphiql is not None else not production

    max_operation_names: int = Field(
        500, ge=1, description="Distinct operation names tracked in metrics; others are 'other'."
    )


class TelemetrySettings(_Section):
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_TELEMETRY_", extra="ignore")

    service_name: str = Field("sightline", description="service.name on traces and metrics.")
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces endpoint (`http://collector:4318`). Unset: no export."
    )
    trace_sample_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Share of traces recorded when exporting (by trace id; a caller's sampled "
        "`traceparent` is always followed). Lower it to cut what tracing costs.",
    )
    log_level: str = Field("INFO", description="Root log level.")
    log_format: LogFormat = Field(LogFormat.JSON, description="`json` or `text` logs.")
    metrics_enabled: bool = Field(True, description="Serve Prometheus metrics on /metrics.")
    metrics_max_error_codes: int = Field(
        100, ge=1, description="Distinct error codes tracked in metrics; others are 'OTHER'."
    )


class SecuritySettings(_Section):
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_SECURITY_", extra="ignore")

    secret_key: SecretStr = Field(
        SecretStr(DEV_SECRET_KEY),
        description="Key for signed values (cursors, tokens). Required in production.",
    )


class AuthSettings(_Section):
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_AUTH_", extra="ignore")

    issuer: str = Field("sightline", description="`iss` of issued tokens (checked on every token).")
    audience: str = Field("sightline-api", description="`aud` of issued tokens (checked).")
    access_token_ttl_s: int = Field(900, ge=30, description="Access token lifetime.")
    refresh_token_ttl_s: int = Field(
        30 * 24 * 3600, ge=60, description="Refresh token lifetime (rotated at every use)."
    )
    clock_skew_s: int = Field(30, ge=0, le=300, description="Leeway for exp/nbf/iat checks.")
    signing_key_grace_s: int = Field(
        3600, ge=0, description="A retired signing key still verifies this long past rotation."
    )
    bootstrap_tenant: str = Field("default", description="Slug of the tenant made at first start.")
    bootstrap_admin_email: str = Field(
        "admin@sightline.local", description="Email of the first admin (embedded default)."
    )
    bootstrap_admin_password: SecretStr | None = Field(
        None,
        description="First admin's password (also makes the admin on an external database). "
        "Unset: generated into DATA_DIR/initial-admin-password on the embedded database.",
    )
    login_window_s: int = Field(
        900, ge=60, description="Window over which failed sign-ins are counted."
    )
    login_free_attempts: int = Field(
        5,
        ge=1,
        description="Failed sign-ins per account and source address before each further "
        "attempt from that source waits (backoff); other sources are not slowed.",
    )
    login_backoff_base_s: float = Field(
        1.0, gt=0, description="First wait of the backoff; it doubles at every further failure."
    )
    login_backoff_max_s: float = Field(
        300.0, gt=0, description="Longest wait of the backoff (a right password passes after it)."
    )
    login_source_failures: int = Field(
        100,
        ge=1,
        description="Failed sign-ins per source address (IPv6: per /64), over all accounts, "
        "before that source is refused for the rest of the window.",
    )
    login_account_failures: int = Field(
        50,
        ge=1,
        description="Failed sign-ins per account from all sources before sources that never "
        "signed in to it are refused for the rest of the window (trusted ones are not).",
    )
    login_trusted_source_s: int = Field(
        30 * 24 * 3600,
        ge=0,
        description="A source that signed in to an account is trusted for it this long.",
    )
    revocation_check_interval_s: float = Field(
        15.0,
        gt=0,
        description="Open sockets and streams re-read revocations this often, in case a "
        "published revocation was missed (normally they end at once).",
    )
    oidc_issuer: str | None = Field(
        None, description="External OpenID Connect provider (issuer URL). Unset: no OIDC login."
    )
    oidc_client_id: str | None = Field(None, description="Client id registered at the provider.")
    oidc_client_secret: SecretStr | None = Field(None, description="Client secret at the provider.")
    oidc_redirect_url: str | None = Field(
        None, description="This server's callback as registered: https://host/oauth/oidc/callback"
    )
    oidc_tenant: str = Field("default", description="Tenant that OIDC users sign in to.")
    oidc_default_role: str = Field(
        "member", description="Role of a user created at first OIDC sign-in (empty: no creation)."
    )
    oidc_scopes: str = Field("openid email profile", description="Scopes asked of the provider.")
    oidc_return_origins: list[str] = Field(
        default_factory=list,
        description="Origins the OIDC login may send the browser back to with its tokens (JSON).",
    )

    @field_validator("bootstrap_admin_password", "oidc_client_secret")
    @classmethod
    def _empty_is_unset(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None

    @model_validator(mode="after")
    def _oidc_is_complete(self) -> AuthSettings:
        if self.oidc_issuer and not (self.oidc_client_id and self.oidc_redirect_url):
            raise ValueError(
                "SIGHTLINE_AUTH_OIDC_ISSUER needs SIGHTLINE_AUTH_OIDC_CLIENT_ID and "
                "SIGHTLINE_AUTH_OIDC_REDIRECT_URL"
            )
        if self.oidc_default_role not in {"", "owner", "admin", "member", "viewer"}:
            raise ValueError("SIGHTLINE_AUTH_OIDC_DEFAULT_ROLE must be a role or empty")
        return self

    @model_validator(mode="after")
    def _backoff_fits_the_window(self) -> AuthSettings:
        # The backoff state lives as long as the window: a longer wait would be forgotten.
        if self.login_backoff_max_s > self.login_window_s:
            raise ValueError(
                "SIGHTLINE_AUTH_LOGIN_BACKOFF_MAX_S must not exceed SIGHTLINE_AUTH_LOGIN_WINDOW_S"
            )
        return self

    api_key_cache_ttl_s: int = Field(
        60,
        ge=0,
        description="A verified API key is trusted from Redis this long (revoking it, or "
        "disabling its user or changing their role, ends that at once). 0: every request "
        "reads the DB.",
    )
    api_key_touch_interval_s: int = Field(
        60, ge=1, description="How often an API key's last-used time is written."
    )


class RateSpec(BaseModel):
    rate_per_s: float = Field(gt=0)
    burst: int = Field(ge=1)


class BudgetSpec(BaseModel):
    """Limits of one resource (0 = unlimited), per tenant and per user, per day and month."""

    tenant_day: float = Field(0, ge=0)
    tenant_month: float = Field(0, ge=0)
    user_day: float = Field(0, ge=0)
    user_month: float = Field(0, ge=0)


OPERATION_CLASSES = ("query", "mutation", "subscription", "chat_run", "vision_job", "ingestion")


def _default_rates() -> dict[str, dict[str, RateSpec]]:
    free = {
        "query": (20, 100),
        "mutation": (5, 20),
        "subscription": (2, 20),
        "chat_run": (0.5, 5),
        "vision_job": (2, 10),
        "ingestion": (0.5, 5),
    }
    return {
        "free": {k: RateSpec(rate_per_s=r, burst=b) for k, (r, b) in free.items()},
        "pro": {k: RateSpec(rate_per_s=r * 10, burst=b * 5) for k, (r, b) in free.items()},
    }


def _default_budgets() -> dict[str, dict[str, BudgetSpec]]:
    return {
        "free": {
            "llm_tokens": BudgetSpec(
                tenant_day=200_000, tenant_month=2_000_000, user_day=50_000, user_month=500_000
            ),
            "compute_seconds": BudgetSpec(
                tenant_day=600, tenant_month=6_000, user_day=120, user_month=1_200
            ),
            "cost": BudgetSpec(tenant_day=5, tenant_month=50, user_day=1, user_month=10),
        },
        "pro": {
            "llm_tokens": BudgetSpec(tenant_day=5_000_000, tenant_month=100_000_000),
            "compute_seconds": BudgetSpec(tenant_day=36_000, tenant_month=720_000),
            "cost": BudgetSpec(tenant_day=500, tenant_month=10_000),
        },
    }


class LimitsSettings(_Section):
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_LIMITS_", extra="ignore")

    enabled: bool = Field(True, description="Enforce rate limits and budgets.")
    default_plan: str = Field("free", description="Plan of tenants whose plan is not listed.")
    rates: dict[str, dict[str, RateSpec]] = Field(
        default_factory=_default_rates,
        description="Per plan and operation class (query, mutation, subscription, chat_run, "
        "vision_job, ingestion): `rate_per_s` and `burst` per principal (JSON).",
    )
    budgets: dict[str, dict[str, BudgetSpec]] = Field(
        default_factory=_default_budgets,
        description="Per plan and resource (llm_tokens, compute_seconds, cost: money, charged "
        "by chat, vision and embeddings): day/month limits per tenant and per user, "
        "0 = unlimited (JSON).",
    )


# Money per compute-second by device kind (cpu, cuda, remote); a price is never negative.
ComputePrices = dict[str, Annotated[float, Field(ge=0)]]


def _default_compute_prices() -> dict[str, float]:
    return {"cpu": 0.00005, "cuda": 0.0005, "remote": 0.0005}


class CostSettings(_Section):
    """Prices of compute: what a vision or embedding model costs per second it computes, by the
    kind of device it ran on (chat aliases price tokens in their ModelSpec). A version's
    manifest or spec may set its own (`compute_second_prices`), which wins."""

    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_COST_", extra="ignore")

    compute_second_prices: ComputePrices = Field(
        default_factory=_default_compute_prices,
        description="Money per compute-second of a vision or embedding model, by device kind "
        "(cpu, cuda, remote: an endpoint or inference server), unless its version names its "
        "own (JSON).",
    )
    usage_flush_s: float = Field(
        10.0,
        gt=0,
        description="How often a replica writes the usage records of calls that have no unit "
        "of work of their own (searches' query embeddings, /v1/embeddings), summed per tenant, "
        "user and model version since the last time (their money is charged as they happen).",
    )
    usage_flush_timeout_s: float = Field(
        10.0, gt=0, description="Longest one such write may take; what it missed is kept."
    )


class ModelSpec(BaseModel):
    """One model alias: where the model is and what it costs."""

    provider: str = Field("openai", pattern="^(openai|local)$")
    base_url: str | None = None  # openai: the endpoint (`http://vllm:8000/v1`)
    model: str | None = None  # the name the endpoint knows; default: the alias
    api_key_env: str | None = None  # the variable (or `<name>_FILE`) holding its key
    prompt_price_per_1k: float = Field(0.0, ge=0)
    completion_price_per_1k: float = Field(0.0, ge=0)
    context_tokens: int = Field(8192, ge=256)
    tools: bool = True  # whether the endpoint supports tool calling
    # Sampling; unset: the packaged model's tuned values (local), else temperature 0.7 and the
    # endpoint's own defaults. repeat_penalty goes to an endpoint as vLLM's repetition_penalty.
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0, le=2)
    stop_repetition_tokens: int | None = Field(None, ge=0)  # 0: never
    seed: int | None = Field(None, ge=0)  # fixed: the same question gets the same answer


class ChatSettings(_Section):
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_CHAT_", extra="ignore")

    llm_base_url: str | None = Field(
        None,
        description="OpenAI-compatible endpoint (`http://vllm:8000/v1`). Unset: the packaged "
        "model (`SIGHTLINE_CHAT_LOCAL_MODEL`), or no chat without it.",
    )
    llm_model: str = Field("default", description="Model name sent to the endpoint.")
    local_model: bool = Field(
        True, description="With no endpoint, serve the packaged SmolLM2-135M-Instruct locally."
    )
    llm_api_key: SecretStr | None = Field(None, description="API key of the endpoint.")
    llm_timeout_s: float = Field(60.0, gt=0, description="Longest silence within a stream.")
    llm_first_token_timeout_s: float = Field(
        30.0, gt=0, description="Longest wait for the endpoint to start answering."
    )
    llm_retries: int = Field(
        3, ge=0, description="Retries on connect errors, 429 and 5xx, before the first token."
    )
    model_close_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Longest wait for a retired model version's client to close once the "
        "turns on it have ended.",
    )
    max_message_chars: int = Field(32_000, ge=1, description="Longest user message.")
    max_attachments: int = Field(
        4, ge=0, description="Most images (analysed vision jobs) one message may attach."
    )
    max_tokens: int = Field(512, ge=1, description="Most tokens one answer may have.")
    temperature: float | None = Field(
        None,
        ge=0,
        le=2,
        description="Sampling temperature of the `default` model (unset: 0.1 for the packaged "
        "model, 0.7 for an endpoint).",
    )
    top_p: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Nucleus sampling of the `default` model (unset: 0.9 for the packaged "
        "model, the endpoint's own otherwise).",
    )
    repeat_penalty: float | None = Field(
        None,
        gt=0,
        le=2,
        description="Repeat penalty of the `default` model (unset: 1.1 for the packaged model, "
        "the endpoint's own otherwise; sent as vLLM's repetition_penalty).",
    )
    stop_repetition_tokens: int | None = Field(
        None,
        ge=0,
        description="End an answer of the `default` model when its last N tokens repeat a "
        "cycle of at most N/3 tokens (unset: 48 for the packaged model, 0 = never otherwise).",
    )
    seed: int | None = Field(
        None,
        ge=0,
        description="Sampling seed of the `default` model: the same question gets the same "
        "answer (evaluations, tests). Unset: random.",
    )
    history_messages: int = Field(20, ge=0, description="Earlier messages sent with a turn.")
    system_prompt: str = Field(
        "You are a helpful assistant.", description="System message of every turn."
    )
    max_active_runs_per_user: int = Field(3, ge=1, description="Runs one user may have going.")
    cancel_wait_s: float = Field(
        2.0,
        ge=0,
        description="How long cancelRun waits for the run to end before it answers CANCELLING "
        "(and deleteConversation for the conversation's runs, before it deletes).",
    )
    run_lease_s: float = Field(
        15.0,
        ge=1,
        description="A run's replica renews its lease every third of this; one that stops "
        "renewing loses its runs (WORKER_LOST, partial answer kept) after this and the grace.",
    )
    run_lost_grace_s: float = Field(
        10.0,
        gt=0,
        description="How late a run's lease may be before another replica fails it; also how "
        "long a replica must have reached Redis before it may (above a third of the lease plus "
        "the Redis socket timeout: a Redis outage then fails no live run).",
    )
    outage_retry_s: float = Field(
        30.0,
        ge=0,
        description="How long a run waits out a PostgreSQL or Redis outage (retrying with "
        "backoff) before it fails.",
    )
    events_ttl_s: int = Field(
        3600, ge=60, description="How long a finished run's events can still be replayed."
    )
    stream_batch_ms: float = Field(
        100.0,
        ge=0,
        le=1000,
        description="Under load (see stream_batch_min_runs), the tokens a run produces within "
        "this many ms of its last TokenDelta event go out together as the next one: one event, "
        "one GraphQL execution and one WebSocket frame for several tokens. The first token after "
        "a quiet spell always goes at once. 0: one event per token.",
    )
    stream_batch_min_runs: int = Field(
        64,
        ge=1,
        description="Runs executing on a replica from which it batches tokens "
        "(stream_batch_ms); below, every token is its own event, sent at once.",
    )
    prompt_price_per_1k: float = Field(
        0.0, ge=0, description="Price per 1,000 prompt tokens of the `default` model."
    )
    completion_price_per_1k: float = Field(
        0.0, ge=0, description="Price per 1,000 completion tokens of the `default` model."
    )
    context_tokens: int = Field(
        0, ge=0, description="Context window of the `default` model (0: 2048 local, 8192 remote)."
    )
    models: dict[str, ModelSpec] = Field(
        default_factory=dict,
        description="More model aliases (`fast`, `large`...) as JSON: provider (openai, local), "
        "base_url, model, api_key_env, prompt/completion_price_per_1k, context_tokens, tools, "
        "temperature, top_p, repeat_penalty, stop_repetition_tokens, seed. "
        "`sendMessage(model:)` picks one; `default` is built from the settings above.",
    )
    memory_ttl_s: int = Field(
        7 * 24 * 3600, ge=60, description="Idle agent threads leave Redis after this long."
    )
    summarize_at: float = Field(
        0.75,
        gt=0,
        le=1,
        description="Older turns are summarised when the prompt fills this share of the window.",
    )
    keep_recent_messages: int = Field(
        4, ge=1, description="Messages kept word for word when older turns are summarised."
    )
    max_tool_rounds: int = Field(3, ge=0, description="Tool-calling rounds in one turn.")
    knowledge_results: int = Field(4, ge=1, description="Sources search_knowledge returns.")
    tool_timeout_s: float = Field(20.0, gt=0, description="Longest a tool call may take.")
    citation_threshold: float = Field(
        0.45,
        ge=-1,
        description="When the model cites no source as [n], each sentence of its answer is "
        "attributed to the source most cosine-similar to it (knowledge-base embedder), if at "
        "least this similar (above 1: never attributed). With MiniLM, paraphrases of a passage "
        "scored 0.51-0.77 against it, unrelated or generic sentences at most 0.27.",
    )
    citation_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Longest the attribution of an answer's sentences to sources may take "
        "(past it, the answer gets no attributed citations; the turn ends normally).",
    )
    citation_max_sentences: int = Field(
        64, ge=1, description="Sentences of one answer that attribution considers (the first)."
    )
    auto_title_chars: int = Field(
        48,
        ge=0,
        le=200,
        description="A conversation without a title gets one with its first answer: the first "
        "question's opening words, up to this many characters. 0: left untitled.",
    )

    @field_validator("llm_api_key")
    @classmethod
    def _empty_key(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None


class JobRecoverySettings(_Section):
    """How background jobs (ingestion, vision) survive the replica running them: a lease each,
    taken over by another replica when it stops being renewed; short outages waited out."""

    job_lease_s: float = Field(
        15.0,
        ge=1,
        description="A job's replica renews its lease every third of this; another replica "
        "takes the job over (runs it again, or fails it) after this and the grace.",
    )
    job_lost_grace_s: float = Field(
        10.0,
        gt=0,
        description="How late a job's lease may be before another replica takes the job over "
        "(see SIGHTLINE_CHAT_RUN_LOST_GRACE_S).",
    )
    job_max_attempts: int = Field(
        3,
        ge=1,
        description="Times a job is started (its replica died each time) before it fails "
        "with WORKER_LOST.",
    )
    outage_retry_s: float = Field(
        30.0,
        ge=0,
        description="How long a job waits out a PostgreSQL or Redis outage (retrying with "
        "backoff) before it is left to recovery.",
    )


class KnowledgeSettings(JobRecoverySettings):
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_KNOWLEDGE_", extra="ignore")

    embedding_base_url: str | None = Field(
        None,
        description="OpenAI-compatible `/v1/embeddings` endpoint; unset: the packaged "
        "all-MiniLM-L6-v2 in a worker process.",
    )
    embedding_model: str = Field(
        "all-minilm-l6-v2", description="Model name sent to the embedding endpoint."
    )
    embedding_api_key: SecretStr | None = Field(None, description="Key of the embedding endpoint.")
    embedding_threads: int = Field(2, ge=1, description="CPU threads of the local embedder.")
    embedding_runtime: EmbeddingRuntime = Field(
        EmbeddingRuntime.ONNX,
        description="What runs the local embedder: `onnx` (ONNX Runtime; the model is exported "
        "once and cached, and its vectors checked against torch's at every start; torch runs it "
        "when that fails) or `torch`.",
    )
    embedding_cache_dir: Path | None = Field(
        None,
        description="Where the local embedder's ONNX export is cached; unset: "
        "$XDG_CACHE_HOME/sightline, else ~/.cache/sightline.",
    )
    embedding_forward_texts: int = Field(
        8,
        ge=1,
        le=1024,
        description="Texts per forward pass of the local embedder, taken by length from its "
        "batch (each pass pads to its longest text).",
    )
    embedding_retries: int = Field(
        5, ge=0, description="Times a job retries the embedder (with backoff) before failing."
    )
    embedding_retry_base_s: float = Field(
        1.0, gt=0, description="First wait before a job retries the embedder (doubles each time)."
    )
    max_document_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1,
        description="Largest document accepted for ingestion (an upload must also fit "
        "`SIGHTLINE_SERVER_MAX_BODY_BYTES`).",
    )
    max_pages: int = Field(1000, ge=1, description="Most pages of one PDF.")
    max_chunks_per_document: int = Field(
        20_000, ge=1, description="Most chunks one document may produce."
    )
    chunk_tokens: int = Field(180, ge=16, le=256, description="Target size of a chunk.")
    chunk_overlap_tokens: int = Field(
        30, ge=0, description="Tokens repeated between neighbouring chunks."
    )
    embed_batch: int = Field(64, ge=1, description="Chunks embedded per call.")
    reembed_check_s: float = Field(
        5.0,
        gt=0,
        description="How often each replica reads which embedding version search uses (a switch "
        "is also published at once), and one replica drives the re-embedding after an "
        "embedding version is promoted.",
    )
    reembed_batch: int = Field(
        128, ge=1, le=4096, description="Chunks re-embedded per step after a promotion."
    )
    reembed_lock_s: float = Field(
        30.0,
        gt=0,
        description="How long the replica that re-embeds holds the job without renewing it "
        "(another takes over after that if it died).",
    )
    max_concurrent_jobs: int = Field(
        2,
        ge=1,
        description="Ingestion jobs one replica extracts at once (others wait); their chunks "
        "are then embedded and stored within `max_chunks_in_flight`.",
    )
    max_chunks_in_flight: int = Field(
        512,
        ge=1,
        description="Chunks of all jobs being embedded and stored at once: many small "
        "documents share the embedder's batches (a larger document takes all of it).",
    )
    progress_chunks: int = Field(
        16, ge=1, description="Chunks of a document embedded between two progress events."
    )
    store_batch_chunks: int = Field(
        256,
        ge=1,
        description="Most chunks of documents that are stored in one transaction together.",
    )
    store_batch_delay_s: float = Field(
        0.02,
        ge=0,
        le=5,
        description="How long a document ready to store waits for others to share its transaction.",
    )
    job_timeout_s: float = Field(1800.0, gt=0, description="Longest an ingestion job may run.")
    jobs_ttl_s: int = Field(
        24 * 3600, ge=60, description="How long a finished job's progress events can be replayed."
    )
    ef_search: int = Field(80, ge=1, le=1000, description="Default HNSW ef_search of a query.")
    candidates: int = Field(
        40, ge=1, le=1000, description="Candidates each ranking (vector, text) gives the fusion."
    )
    fusion: Literal["score", "rrf"] = Field(
        "score",
        description="How hybrid search fuses its vector and text rankings: `score` (cosine "
        "similarity plus, for the text ranking's passages, their BM25 score relative to the "
        "best, weighted by how far the best stands out: `fusion_text_*`) or `rrf` (weighted "
        "reciprocal rank fusion: `rrf_*`).",
    )
    fusion_text_weight: float = Field(
        0.79,
        ge=0,
        description="Most a passage's BM25 score adds to its cosine similarity in the `score` "
        "fusion (fitted by bench/retrieval_quality.py).",
    )
    fusion_text_floor: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of `fusion_text_weight` BM25 keeps when its best match does not "
        "stand out from the second (the rest grows with that margin). 0: BM25 counts only as "
        "far as its best match stands out, which held on every labelled set of "
        "bench/retrieval_quality.py; a floor tuned on one set lost to vector search on another.",
    )
    rrf_k: int = Field(
        5,
        ge=1,
        description="Reciprocal rank fusion constant (tuned by bench/retrieval_quality.py).",
    )
    rrf_vector_weight: float = Field(
        1.0, ge=0, description="Weight of the vector ranking in the fusion (hybrid search)."
    )
    rrf_text_weight: float = Field(
        1.0, ge=0, description="Weight of the text (BM25) ranking in the fusion (hybrid search)."
    )
    bm25_k1: float = Field(
        1.2, ge=0, description="BM25 term-frequency saturation of the text ranking."
    )
    bm25_b: float = Field(
        0.9, ge=0, le=1, description="BM25 length normalisation of the text ranking (0: none)."
    )
    text_terms: int = Field(
        5, ge=1, le=64, description="Rarest words of a query the text ranking matches on."
    )
    text_max_matches: int = Field(
        500,
        ge=10,
        description="Most matching passages the text ranking scores per query, taken word by "
        "word, rarest first.",
    )
    common_word_share: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Words in more than this share of a tenant's chunks are left out of the "
        "text ranking (too common to tell passages apart).",
    )
    min_relevance: float = Field(
        0.37,
        ge=-1,
        le=1,
        description="For models without tool calling: the knowledge base is searched and its "
        "passages put in the prompt only when its nearest chunk is at least this cosine-similar "
        "to the message (calibrated by bench/retrieval_quality.py; -1: always).",
    )
    max_k: int = Field(50, ge=1, description="Most results one search returns.")
    max_query_chars: int = Field(2000, ge=1, description="Longest search query.")
    query_cache_ttl_s: int = Field(
        86400, ge=0, description="How long query embeddings stay cached in Redis (0: off)."
    )

    @field_validator("embedding_api_key")
    @classmethod
    def _empty_key(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None


def _usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class VisionSettings(JobRecoverySettings):
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_VISION_", extra="ignore")

    enabled: bool = Field(True, description="Start the inference pool and accept images.")
    workers: int = Field(1, ge=1, le=64, description="Inference worker processes.")
    device: str = Field(
        "auto", description="`cpu`, `cuda`, `cuda:N`, or `auto` (the first GPU if there is one)."
    )
    threads: int = Field(
        0,
        ge=0,
        description="CPU threads of each inference worker (0: the cores this process may use, "
        "shared among the workers).",
    )
    batch_slab_mb: int = Field(
        64,
        ge=0,
        le=4096,
        description="Shared memory (MiB) per batch an inference worker holds: a batch of arrays "
        "of one shape is stacked into it instead of pickled through a pipe (0: the pipe only). "
        "A larger batch, and any other input, take the pipe.",
    )
    batches_in_flight: int = Field(
        1,
        ge=1,
        le=4,
        description="Batches an inference worker holds at once. 2 lets the next batch travel "
        "while one runs (GPUs: ResNet-50 on an H200 went from 0.57 to 0.82 of the raw model's "
        "speed), but its items can no longer be withdrawn when cancelled, and a live frame may "
        "wait behind two batches.",
    )
    models_dir: Path | None = Field(
        None, description="Folder of operators' model manifests (`*.json`), served beside ours."
    )
    classifier: str = Field("efficientnet-lite0", description="Default classification model.")
    detector: str = Field(
        "ssd-mobilenet-v2-coco",
        description="Default detection model (`haar-frontalface`: the face cascade).",
    )
    ocr_engine: str = Field(
        "tesseract",
        description="Default OCR engine: `tesseract`, or an OCR model of the inference pool "
        "(`rapidocr`: PP-OCRv6 on onnxruntime).",
    )
    detect_min_score: float = Field(
        0.5, ge=0, le=1, description="Detection: the score a box needs, unless a request asks."
    )
    detect_max_detections: int = Field(
        100,
        ge=1,
        le=1000,
        description="Detection: the most boxes per image (a request may ask fewer).",
    )
    max_image_bytes: int = Field(
        16 * 1024 * 1024, ge=1, description="Largest image upload (bytes)."
    )
    max_pixels: int = Field(
        40_000_000, ge=1, description="Largest decoded image (width x height): bombs refused."
    )
    animated: str = Field(
        "first_frame",
        pattern="^(first_frame|reject)$",
        description="Animated images: analyse the `first_frame` or `reject` them.",
    )
    ocr_threads: int = Field(1, ge=1, description="Threads (each with a Tesseract engine) for OCR.")
    decode_threads: int = Field(
        2,
        ge=1,
        description="Threads that decode images (uploads and live frames): costly images wait "
        "for these instead of taking every core from the models.",
    )
    tessdata: Path = Field(
        Path("/usr/share/tesseract-ocr/5/tessdata"), description="Tesseract language data."
    )
    infer_timeout_s: float = Field(30.0, gt=0, description="Longest wait for one model call.")
    backend: str = Field(
        "local",
        pattern="^(local|remote)$",
        description="Where vision models run: `local` (this process's inference pool) or "
        "`remote` (the inference service at `remote_url`, over the Open Inference Protocol: "
        "Triton, KServe or `sightline inference serve`; no torch loads in the API).",
    )
    remote_url: str = Field(
        "127.0.0.1:8000",
        description="The inference service's address (host:port) for `backend=remote`: its "
        "HTTP port, or its gRPC port (Triton's 8001) with `remote_protocol=grpc`.",
    )
    remote_protocol: str = Field(
        "http",
        pattern="^(http|grpc)$",
        description="Remote inference: `http` or `grpc` (needs tritonclient[grpc], from "
        "requirements-serve.txt; one HTTP/2 connection, less per call).",
    )
    remote_call_timeout_s: float = Field(
        10.0, gt=0, description="Remote inference: longest wait for one call."
    )
    remote_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="Remote inference: retries of a call that failed on the way (refused, "
        "dropped, timed out, the server busy); model calls are idempotent.",
    )
    remote_breaker_failures: int = Field(
        5,
        ge=1,
        description="Remote inference: failed calls in a row that open the circuit (calls then "
        "fail at once with INFERENCE_UNAVAILABLE).",
    )
    remote_breaker_reset_s: float = Field(
        5.0, gt=0, description="Remote inference: how long the circuit stays open before a trial."
    )
    serve_host: str = Field(
        "127.0.0.1",
        description="`sightline inference serve`: the address its HTTP, gRPC and metrics "
        "endpoints bind (0.0.0.0 to be reached from other machines).",
    )
    serve_http_port: int = Field(
        8000, ge=1, le=65535, description="`sightline inference serve`: HTTP port."
    )
    serve_grpc_port: int = Field(
        8001, ge=1, le=65535, description="`sightline inference serve`: gRPC port."
    )
    serve_stub_env: Path | None = Field(
        None,
        description="`sightline inference serve`: the virtualenv of Triton's Python backend "
        "stub (numpy 1; made there once when missing). None: `triton-stub` in the data dir.",
    )
    serve_metrics_port: int = Field(
        8002, ge=1, le=65535, description="`sightline inference serve`: Prometheus metrics port."
    )
    version_load_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Longest a new model version may take to load and warm in every worker "
        "before it is reported failed (the versions serving are unchanged).",
    )
    version_drain_s: float = Field(
        30.0,
        ge=0,
        description="How long a retired model version may finish its queued and running "
        "items before it unloads (items still queued then fail).",
    )
    job_timeout_s: float = Field(120.0, gt=0, description="Longest an analysis job may run.")
    max_concurrent_jobs: int = Field(4, ge=1, description="Jobs one replica runs at once.")
    jobs_ttl_s: int = Field(
        24 * 3600, ge=60, description="How long a finished job's events can be replayed."
    )
    compute_hold_s: float = Field(
        10.0,
        ge=0,
        description="Compute-seconds a job holds on the requester's budget until it is charged "
        "what its tasks took.",
    )
    live_max_fps: float = Field(
        15.0, gt=0, description="Live camera: frames per second one connection may send."
    )
    live_max_frame_bytes: int = Field(
        2 * 1024 * 1024,
        ge=1,
        description="Live camera: largest frame (bytes); a larger one gets a per-frame "
        "PAYLOAD_TOO_LARGE error.",
    )
    live_max_pixels: int = Field(
        3840 * 2160,
        ge=1,
        description="Live camera: largest frame (width x height, read from the header before "
        "decoding; 4K UHD).",
    )
    live_decode_share: float = Field(
        0.5,
        gt=0,
        description="Live camera: share of one core a connection may spend decoding its frames, "
        "on average; past it, its frames wait (and newer ones replace them).",
    )
    live_decode_burst_s: float = Field(
        2.0, gt=0, description="Live camera: decode seconds a connection may spend at once."
    )
    live_frame_timeout_s: float = Field(
        5.0, gt=0, description="Live camera: longest the analysis of one frame may take."
    )
    live_auth_timeout_s: float = Field(
        10.0, gt=0, description="Live camera: time to send the auth message after connecting."
    )
    live_charge_every_s: float = Field(
        5.0,
        gt=0,
        description="Live camera: how often a session's frames are charged to its caller's "
        "compute-seconds and money budgets and recorded as usage (and when it ends); once a "
        "budget is used up, its next frames are refused with BUDGET_EXCEEDED.",
    )

    def worker_threads(self) -> int:
        """CPU threads of each inference worker: `threads`, or with 0 the cores this process
        may use divided among the workers (at least one). One worker on 2 cores takes both: a
        RapidOCR page of the quality bench needs about 1.1 CPU-seconds, more than its 1 s
        target on one thread; on two its lines are read side by side. The runtimes' threads
        sleep when idle, so the server keeps the cores between batches."""
        if self.threads:
            return self.threads
        return max(1, _usable_cores() // self.workers)


class GuardrailEngine(StrEnum):
    LOCAL = "local"
    NEMO = "nemo"


class ClassifierMode(StrEnum):
    OFF = "off"
    UNCERTAIN = "uncertain"
    ALWAYS = "always"


class GuardrailSettings(_Section):
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_GUARDRAILS_", extra="ignore")

    enabled: bool = Field(True, description="Run the rails on chat input, retrieval and output.")
    engine: GuardrailEngine = Field(
        GuardrailEngine.LOCAL,
        description="`local`: the fast checks called directly; `nemo`: the same checks as "
        "actions of the NeMo Guardrails flows in backend/guardrails/config (its streaming "
        "output rails check the answer chunk by chunk).",
    )
    policy: dict[str, Any] = Field(
        default_factory=dict,
        description="Default policy of every tenant (JSON, merged over the built-in one; "
        "tenants override it with `updateGuardrailPolicy`).",
    )
    policy_cache_s: float = Field(
        10.0, ge=0, description="How long a replica keeps a tenant's policy before re-reading it."
    )
    check_timeout_s: float = Field(
        2.0, gt=0, description="Longest the input rails may take; then the message is refused."
    )
    inline_max_chars: int = Field(
        256,
        ge=0,
        le=4096,
        description="A message (with the recent turns its injection rail reads) up to this long "
        "gets the local rails on the event loop, where they take about 0.1-0.3 ms; longer ones "
        "in a thread, whose handoff cost a turn about 1.7 ms on a busy machine. 0: always a "
        "thread.",
    )
    output_hold_chars: int = Field(
        64,
        ge=8,
        le=1024,
        description="Most characters of a streamed answer held back while they may still "
        "become personal data.",
    )
    image_threads: int = Field(1, ge=1, description="CPU threads of the NSFW image classifier.")
    classifier: ClassifierMode = Field(
        ClassifierMode.OFF,
        description="The transformer injection classifier (metatronnanoguard, in a worker "
        "process): `uncertain` runs it only on messages the cheap rails leave unsure (see "
        "`classifier_uncertain_score` and `classifier_uncertain_chars`), `always` on every "
        "message they do not block, `off` never (the default: on held-out prompts it added "
        "little, see README).",
    )
    classifier_uncertain_score: float = Field(
        0.05,
        ge=0,
        le=1,
        description="`uncertain` mode: a message whose cheap injection score is at least this "
        "goes to the classifier.",
    )
    classifier_uncertain_chars: int = Field(
        160,
        ge=0,
        description="`uncertain` mode: a message at least this long goes to the classifier "
        "whatever its cheap score (attacks dressed as documents are long and score low).",
    )
    classifier_chars: int = Field(
        2000,
        ge=64,
        le=100_000,
        description="The classifier reads at most this many characters of a message (its start "
        "and its end).",
    )
    classifier_timeout_s: float = Field(
        1.0,
        gt=0,
        description="Longest the classifier may take on a message; then its worker "
        "is restarted and the fail policy applies.",
    )
    classifier_threads: int = Field(1, ge=1, description="CPU threads of the classifier worker.")
    classifier_fail_open: bool = Field(
        False,
        description="When the classifier fails or times out: refuse the message (false, as every "
        "input rail fails closed) or let it through on the cheap rails' verdict with a `warn` "
        "decision (true).",
    )


class PrivacySettings(_Section):
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_PRIVACY_", extra="ignore")

    policy: dict[str, Any] = Field(
        default_factory=dict,
        description="Default data protection policy of every tenant (JSON, merged over the "
        'built-in one: `{"retention": {"messages_days": 365}, "store_messages_redacted": '
        "true}`); tenants override it with `updatePrivacyPolicy`.",
    )
    policy_cache_s: float = Field(
        10.0, ge=0, description="How long a replica keeps a tenant's policy before re-reading it."
    )
    purge_enabled: bool = Field(
        True, description="Delete what is past each tenant's retention in the background."
    )
    purge_interval_s: float = Field(
        3600.0, ge=1, description="One purge pass per this long, across all replicas."
    )
    purge_start_delay_s: float = Field(
        60.0, ge=0, description="Wait after start before a replica first looks for a due pass."
    )
    purge_timeout_s: float = Field(
        300.0, gt=0, description="Longest one purge pass runs; the next pass goes on from there."
    )
    purge_batch_size: int = Field(
        500, ge=1, le=100_000, description="Rows deleted per transaction by purges and erasures."
    )
    purge_document_batch_size: int = Field(
        10, ge=1, le=10_000, description="Documents (with their chunks) deleted per transaction."
    )
    unscoped_audit_days: int | None = Field(
        90,
        ge=1,
        description="Days kept of audit events that belong to no tenant (failed sign-ins to "
        "unknown tenants). Unset: kept forever.",
    )
    erasure_wait_s: float = Field(
        20.0,
        ge=0,
        description="How long an erasure request waits for the erasure to finish before it "
        "answers PENDING (it goes on in the background and resumes after a restart).",
    )
    run_stop_timeout_s: float = Field(
        15.0, ge=0, description="How long an erasure waits for the subject's chat runs to stop."
    )
    stale_run_s: float = Field(
        3600.0,
        ge=1,
        description="A run marked queued or running that has not changed for this long is taken "
        "for dead (its replica crashed) and does not hold up an erasure.",
    )
    export_ttl_s: int = Field(
        600, ge=10, description="How long the download of a requested data export stays open."
    )
    export_page_size: int = Field(
        200, ge=1, le=10_000, description="Rows read per query while an export streams."
    )
    operator_tenant: str | None = Field(
        None,
        description="Slug of the tenant whose owners are platform operators (they may erase "
        "other tenants over GraphQL and manage the model registry). Unset: tenants are erased "
        "and models managed only with the CLI.",
    )

    @field_validator("unscoped_audit_days", "operator_tenant", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value


class LifecycleSettings(_Section):
    """Model lifecycle: the registry (versions, traffic policies, pins) and how replicas converge
    on it; per-version serving figures, shadow comparison and the canary guard."""

    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_MODELS_", extra="ignore")

    seed: bool = Field(
        True,
        description="At start, register the models this server serves (vision manifests, chat "
        "aliases, the embedder) that the registry lacks, live with all the traffic.",
    )
    reconcile_s: float = Field(
        30.0,
        gt=0,
        description="Each replica re-reads the registry from PostgreSQL this often, besides on "
        "every change published over Redis: a replica that missed a message converges by then.",
    )
    reload_timeout_s: float = Field(
        10.0, gt=0, description="Longest one re-read of the registry may take."
    )
    listener_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest a replica's listener (routing, the inference pool) may take to "
        "take in a new registry state; one that takes longer is cancelled and logged.",
    )
    heartbeat_s: float = Field(
        5.0, gt=0, description="How often a replica says it is alive (in Redis)."
    )
    replica_ttl_s: float = Field(
        20.0,
        gt=0,
        description="A replica not heard from for this long no longer counts when a loading "
        "version waits for every replica to report it ready.",
    )
    readiness_ttl_s: int = Field(
        3600, ge=1, description="How long a replica's report that it loaded a version is kept."
    )
    verify_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Longest the sha256 check of a registered manifest's files may take.",
    )
    max_spec_bytes: int = Field(
        65_536,
        ge=256,
        description="Largest manifest or endpoint spec (as JSON) a model version may have.",
    )

    stats_bucket_s: int = Field(
        10,
        ge=1,
        le=3600,
        description="Width of the time buckets in which every replica adds up each model "
        "version's requests, errors, latency, compute and cost (in Redis).",
    )
    stats_retention_s: int = Field(
        3600,
        ge=60,
        description="How long those buckets are kept: the longest window `modelComparison` "
        "and the canary guard can read.",
    )
    stats_flush_interval_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="How often a replica sends the figures it gathered to Redis (one round "
        "trip for all of them; never on a request's path).",
    )
    stats_flush_timeout_s: float = Field(
        5.0, gt=0, description="Longest wait for one flush; figures of a failed flush are lost."
    )
    stats_max_pending: int = Field(
        10_000,
        ge=1,
        description="Most distinct (model, version, bucket) series a replica holds between "
        "flushes; figures past it are dropped (and logged).",
    )
    timeline_max_points: int = Field(
        360,
        ge=1,
        le=10_000,
        description="Most points (window / step) one `operationsTimeline` reads per version.",
    )
    timeline_max_events: int = Field(
        500,
        ge=1,
        description="Most version events (promotions, canaries, rollbacks) one "
        "`operationsTimeline` returns: the newest.",
    )
    shadow_max_in_flight: int = Field(
        4,
        ge=0,
        description="Most shadow runs at once on a replica; a sampled request past it is not "
        "mirrored. 0 turns shadow traffic off.",
    )
    shadow_timeout_s: float = Field(
        60.0, gt=0, description="Longest a shadow run may take before it is cancelled."
    )
    canary_enabled: bool = Field(
        True,
        description="Run the canary guard: roll a canary back by itself when it breaks its "
        "guard against live.",
    )
    canary_interval_s: float = Field(
        15.0, gt=0, description="How often the canary guard compares each canary with live."
    )
    canary_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest one pass of the canary guard may take (rollbacks included).",
    )


class DriftSettings(_Section):
    """Drift per model version: a reference window against a sliding current window of each
    input and output signal, compared periodically (PSI, Kolmogorov-Smirnov, Jensen-Shannon,
    the embeddings' centroid distance)."""

    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_DRIFT_", extra="ignore")

    enabled: bool = Field(
        True,
        description="Record drift samples and compare the windows; off, nothing is recorded on "
        "a request's path.",
    )
    reference_size: int = Field(
        500,
        ge=2,
        le=100_000,
        description="Samples per signal in a version's reference window: the first ones it "
        "serves, unless an operator pins a window (`pinDriftReference`).",
    )
    window_size: int = Field(
        500, ge=2, le=100_000, description="Samples per signal in the sliding current window."
    )
    min_samples: int = Field(
        100,
        ge=2,
        description="Fewest samples of a signal in each window before it is compared.",
    )
    history_size: int = Field(
        5_000,
        ge=2,
        le=1_000_000,
        description="Latest samples kept per version and signal (in Redis): the current window "
        "is the newest of them; a pinned reference is chosen from them.",
    )
    bins: int = Field(
        10, ge=2, le=100, description="Bins (the reference's quantiles) of PSI and Jensen-Shannon."
    )
    psi_threshold: float = Field(
        0.2, gt=0, description="PSI above which a distribution signal has drifted."
    )
    centroid_threshold: float = Field(
        0.1,
        gt=0,
        description="Cosine distance between the query embeddings' centroids above which "
        "they have drifted.",
    )
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description='Thresholds of single signals, by name (JSON: {"answer_length": 0.3}); the '
        "others get the PSI or centroid threshold.",
    )
    interval_s: float = Field(
        60.0, gt=0, description="How often the windows are compared (on one replica at a time)."
    )
    timeout_s: float = Field(
        30.0, gt=0, description="Longest one comparison of every version may take."
    )
    flush_interval_s: float = Field(
        2.0, gt=0, le=60, description="How often a replica sends its samples to Redis."
    )
    flush_timeout_s: float = Field(
        5.0, gt=0, description="Longest wait for one flush; samples of a failed flush are lost."
    )
    max_pending: int = Field(
        20_000,
        ge=1,
        description="Most samples a replica holds between flushes; samples past it are dropped.",
    )
    snapshot_retention_days: int = Field(
        30, ge=1, description="Days the drift snapshots (modelDrift's history) are kept."
    )
    max_history: int = Field(
        500, ge=1, description="Most snapshots one `modelDrift` query returns (`last`)."
    )

    @field_validator("thresholds")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [name for name, threshold in value.items() if not threshold > 0]
        if bad:
            raise ValueError(f"drift thresholds must be above 0: {', '.join(sorted(bad))}")
        return value


class OpenAIAPISettings(_Section):
    """The OpenAI-compatible REST endpoints under /v1."""

    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_OPENAI_", extra="ignore")

    max_messages: int = Field(
        256, ge=1, description="Most messages in one `/v1/chat/completions` request."
    )
    max_prompt_chars: int = Field(
        128_000, ge=1, description="Most characters of all the messages of one request together."
    )
    max_embedding_inputs: int = Field(
        256, ge=1, description="Most texts in one `/v1/embeddings` request."
    )
    max_embedding_chars: int = Field(
        8_192, ge=1, description="Longest text `/v1/embeddings` embeds."
    )


class Settings(_Section):
    """All of Sightline's settings. `Settings()` reads the environment; tests pass sections in."""

    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_", extra="ignore")

    env: Environment = Field(
        Environment.DEVELOPMENT, description="development, test or production."
    )
    data_dir: Path = Field(
        Path(".sightline"),
        description="Where embedded PostgreSQL and Valkey keep their data (survives restarts).",
    )
    server: ServerSettings = Field(default_factory=ServerSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    graphql: GraphQLSettings = Field(default_factory=GraphQLSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    chat: ChatSettings = Field(default_factory=ChatSettings)
    knowledge: KnowledgeSettings = Field(default_factory=KnowledgeSettings)
    guardrails: GuardrailSettings = Field(default_factory=GuardrailSettings)
    vision: VisionSettings = Field(default_factory=VisionSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    openai: OpenAIAPISettings = Field(default_factory=OpenAIAPISettings)
    lifecycle: LifecycleSettings = Field(default_factory=LifecycleSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    cost: CostSettings = Field(default_factory=CostSettings)

    @model_validator(mode="after")
    def _production_is_explicit(self) -> Settings:
        if self.env is not Environment.PRODUCTION:
            return self
        problems = []
        key = self.security.secret_key.get_secret_value()
        if key == DEV_SECRET_KEY or len(key) < 32:
            problems.append("SIGHTLINE_SECURITY_SECRET_KEY must be set (32+ characters)")
        if self.database.url is None:
            problems.append("SIGHTLINE_DATABASE_URL must be set (no embedded database)")
        if self.redis.url is None:
            problems.append("SIGHTLINE_REDIS_URL must be set (no embedded Redis)")
        if problems:
            raise ValueError("refusing to start in production: " + "; ".join(problems))
        return self

    @model_validator(mode="after")
    def _frames_fit_in_messages(self) -> Settings:
        explicit = self.server.max_ws_message_bytes
        if (
            explicit is not None
            and self.vision.enabled
            and explicit <= self.vision.live_max_frame_bytes
        ):
            raise ValueError(
                "SIGHTLINE_SERVER_MAX_WS_MESSAGE_BYTES must be larger than "
                "SIGHTLINE_VISION_LIVE_MAX_FRAME_BYTES (an oversized frame is answered "
                "with a per-frame error, which the socket must be able to read)"
            )
        return self

    @property
    def ws_max_message_bytes(self) -> int:
        """The WebSocket transport's message limit (uvicorn's `ws_max_size`): one number for
        every socket, always above the live camera's frame limit."""
        explicit = self.server.max_ws_message_bytes
        return explicit if explicit is not None else 2 * self.vision.live_max_frame_bytes

    @property
    def should_migrate_on_start(self) -> bool:
        if self.database.migrate_on_start is not None:
            return self.database.migrate_on_start
        return self.database.url is None


SECTIONS: tuple[type[_Section], ...] = (
    Settings,
    ServerSettings,
    DatabaseSettings,
    RedisSettings,
    GraphQLSettings,
    TelemetrySettings,
    SecuritySettings,
    AuthSettings,
    LimitsSettings,
    ChatSettings,
    KnowledgeSettings,
    GuardrailSettings,
    VisionSettings,
    PrivacySettings,
    OpenAIAPISettings,
    LifecycleSettings,
    CostSettings,
)


def settings_table() -> str:
    """Every setting as a Markdown table row: variable, default, meaning (the README's table)."""
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    structured: list[str] = []
    for section in SECTIONS:
        prefix = str(section.model_config.get("env_prefix", ""))
        for name, field in section.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, _Section):
                continue
            if field.default_factory is not None:
                default: Any = field.default_factory()  # type: ignore[call-arg]
            else:
                default = field.default
            variable = f"{prefix}{name.upper()}"
            if isinstance(default, dict):
                dumped = json.dumps(TypeAdapter(Any).dump_python(default, mode="json"))
                structured.append(f"`{variable}` default: `{dumped}`")
                rows.append(f"| `{variable}` | (JSON, below) | {field.description or ''} |")
                continue
            if isinstance(default, SecretStr):
                default = "(dev only)"
            elif isinstance(default, StrEnum):
                default = default.value
            shown = "unset" if default is None else f"`{default}`"
            if default == []:
                shown = "`[]`"
            rows.append(f"| `{prefix}{name.upper()}` | {shown} | {field.description or ''} |")
    rows.append("")
    rows.extend(f"{line}\n" for line in structured)
    rows.append("Any setting can also come from a file: `<VARIABLE>_FILE=/run/secrets/name`.")
    return "\n".join(rows)
