"""The `sightline` command: serve, migrate, doctor, schema, config, version, users, keys,
ingest, privacy, models."""

from __future__ import annotations

import asyncio
import difflib
import errno
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from redis.asyncio import Redis
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from backend import __version__
from backend.auth.principal import Principal
from backend.auth.service import AuthService
from backend.config import Settings, settings_table
from backend.core.db import Database, DatabaseUnreachable
from backend.core.embedded import resolve_services
from backend.core.migrations import (
    current_revisions,
    head_revisions,
    known_revisions,
    upgrade_to_head,
)
from backend.core.models import UserRole
from backend.core.redis import KeySpace, RedisUnreachable, connect_redis, ping_redis
from backend.core.tasks import cancel_and_wait
from backend.core.telemetry import configure_logging
from backend.errors import AppError
from backend.inference.catalog import PACKAGED_MODELS
from backend.knowledge.service import EmbeddingSpent, KnowledgeService
from backend.knowledge.versions import Reembedding, read_state
from backend.lifecycle._series import Series
from backend.lifecycle.comparison import ModelComparisons
from backend.lifecycle.errors import VersionNotFound
from backend.lifecycle.policy import Arm, ModelKind, RegistrySnapshot, TrafficPolicy
from backend.lifecycle.service import ModelRegistryService
from backend.lifecycle.shadow import ShadowAgreement, ShadowLedger
from backend.lifecycle.stats import ServingStats
from backend.limits.ratelimit import RateLimiter
from backend.limits.usage import UsagePart
from backend.privacy.schemas import Erasure, ErasureStatus
from backend.privacy.service import PrivacyService


def _untyped_flags(params: list[Any]) -> list[Any]:
    """Typer's help prints each option's type beside it, and `<bool>` beside flags (`--help`
    too), which take no value: an empty metavar prints nothing there."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _untyped_flags(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _untyped_flags(super().get_params(ctx))


class _Typer(typer.Typer):
    """Typer whose commands and groups print flags without a type in their help."""

    def __init__(self, **options: Any) -> None:
        super().__init__(cls=_Group, **options)

    def command(self, *args: Any, **options: Any) -> Any:
        return super().command(*args, **{"cls": _Command, **options})


app = _Typer(help="Sightline: real-time AI backend.", no_args_is_help=True)
schema_app = _Typer(
    help="The GraphQL schema file (schema.graphql) and its releases.", no_args_is_help=True
)
app.add_typer(schema_app, name="schema")

out = Console()
err = Console(stderr=True)

TESSDATA_DIR = Path("/usr/share/tesseract-ocr/5/tessdata")
# `serve --workers N` hands its pid to the worker processes: they die with it (see worker_app)
SUPERVISOR_PID_VARIABLE = "SIGHTLINE_SERVE_SUPERVISOR_PID"


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _settings() -> Settings:
    """Settings from the environment; an invalid one is one clear line, not a traceback."""
    try:
        return Settings()
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise _fail(f"invalid configuration: {reasons}") from None


async def _preflight(settings: Settings) -> None:
    """Fails fast (one line) when a configured database or Redis does not answer."""
    if settings.database.url is not None:
        db = Database.connect(settings.database.url.get_secret_value(), settings.database)
        try:
            await db.ping(settings.database.connect_timeout_s)
        finally:
            await db.dispose()
    if settings.redis.url is not None:
        client = connect_redis(settings.redis.url.get_secret_value(), settings.redis)
        try:
            await ping_redis(client, settings.redis.connect_timeout_s)
        finally:
            await client.aclose()


def _run_checked(coro: Awaitable[None]) -> None:
    try:
        asyncio.run(coro)  # type: ignore[arg-type]
    except (DatabaseUnreachable, RedisUnreachable) as exc:
        raise _fail(str(exc)) from None


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Bind port.")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Worker processes.")] = None,
) -> None:
    """Start the API server (embedded PostgreSQL and Valkey when no URLs are configured)."""
    import uvicorn

    settings = _settings()
    configure_logging(settings.telemetry)
    server = settings.server.model_copy(
        update={
            k: v
            for k, v in {"host": host, "port": port, "workers": workers}.items()
            if v is not None
        }
    )
    _check_port_free(server.host, server.port)
    # The app announces where it serves: the address given here, not the configured one.
    settings = settings.model_copy(update={"server": server})
    _run_checked(_preflight(settings))
    common = {
        "host": server.host,
        "port": server.port,
        "log_config": None,
        "ws_max_size": settings.ws_max_message_bytes,
        "ws_per_message_deflate": server.ws_compression,
        "timeout_graceful_shutdown": int(server.graceful_shutdown_s),
        "proxy_headers": True,
    }
    if server.workers == 1:
        # One process: the app's lifespan starts, migrates and stops the embedded servers.
        from backend.app import create_app
        from backend.core import server as quiet

        quiet.run(create_app(settings), **common)
        return

    # Several workers share one set of embedded servers, started (and migrated) here.
    services = resolve_services(
        settings.data_dir,
        settings.database.url.get_secret_value() if settings.database.url else None,
        settings.redis.url.get_secret_value() if settings.redis.url else None,
    )
    metrics_dir = tempfile.mkdtemp(prefix="sightline-metrics-")
    try:
        assert services.database_url
        assert services.redis_url
        os.environ["SIGHTLINE_DATABASE_URL"] = services.database_url
        os.environ["SIGHTLINE_REDIS_URL"] = services.redis_url
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        os.environ["SIGHTLINE_SERVER_HOST"] = server.host  # where the workers say they serve
        os.environ["SIGHTLINE_SERVER_PORT"] = str(server.port)
        if settings.should_migrate_on_start:
            _run_checked(_migrate(services.database_url, settings))
        os.environ["SIGHTLINE_DATABASE_MIGRATE_ON_START"] = "false"
        os.environ[SUPERVISOR_PID_VARIABLE] = str(os.getpid())
        if "postgresql" in services.embedded or settings.auth.bootstrap_admin_password:
            # Here, once: workers starting together would race to create the first admin
            # (and with an embedded database, which they see as external, none would).
            _run_checked(_bootstrap(services.database_url, services.redis_url, settings))
        uvicorn.run("backend.cli:worker_app", factory=True, workers=server.workers, **common)  # type: ignore[arg-type]
    finally:
        services.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _check_port_free(host: str, port: int) -> None:
    """Fails in one line when the address cannot be listened on (a port in use), before the
    start does any work: uvicorn binds only after the app's startup (embedded PostgreSQL,
    migrations, the first admin) and would announce someone else's server as ready."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn binds
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            probe.bind((host, port))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        hint = " (another server is listening there: stop it or pick --port)"
        in_use = exc.errno == errno.EADDRINUSE
        raise _fail(
            f"cannot listen on {host}:{port}: {reason}" + (hint if in_use else "")
        ) from None


def worker_app() -> Any:
    """The app of one worker process of `serve --workers N` (uvicorn's factory). The worker
    dies with the supervisor: killed with SIGKILL, it could not stop them, and they (with
    their inference and embedding workers) would serve on, unsupervised, for good."""
    from backend.app import create_app
    from backend.inference.lifeline import die_with_parent

    supervisor = os.environ.get(SUPERVISOR_PID_VARIABLE)
    if supervisor:
        die_with_parent(int(supervisor))
    return create_app()


async def _migrate(url: str, settings: Settings) -> None:
    db = Database.connect(url, settings.database)
    try:
        await db.ping(settings.database.connect_timeout_s)
        await upgrade_to_head(db.engine)
        revisions = await current_revisions(db.engine)
        out.print(f"database at revision {', '.join(sorted(revisions))}")
    finally:
        await db.dispose()


async def _bootstrap(database_url: str, redis_url: str, settings: Settings) -> None:
    from backend.app import bootstrap_first_admin, build_signer

    db = Database.connect(database_url, settings.database)
    redis = connect_redis(redis_url, settings.redis)
    try:
        keys = KeySpace(settings.redis.key_prefix)
        auth = AuthService(db, build_signer(settings), redis, keys, settings.auth)
        await bootstrap_first_admin(auth, settings)
    finally:
        await redis.aclose()
        await db.dispose()


inference_app = _Typer(
    help="The inference service: vision models over the Open Inference Protocol (Triton).",
    no_args_is_help=True,
)
app.add_typer(inference_app, name="inference")


@inference_app.command("serve")
def inference_serve(  # noqa: PLR0917 - typer's options are the parameters
    model: Annotated[
        list[str] | None,
        typer.Option(
            help="A model to serve (repeat it); none: every classifier, detector and OCR model."
        ),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind address of every endpoint.")] = None,
    http_port: Annotated[int | None, typer.Option(help="HTTP port.")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port.")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus metrics port.")] = None,
    parent_pid: Annotated[
        int | None, typer.Option(help="Die with this process (a supervisor's, a test's).")
    ] = None,
) -> None:
    """Serve the manifests' models through NVIDIA Triton (PyTriton), each with Triton's dynamic
    batcher set from its manifest (max batch, preferred sizes, queue delay). Needs
    requirements-serve.txt."""
    from backend.inference.manifest import ManifestError, load_manifests
    from backend.inference.serve import ServeAddress, servable, serve

    settings = _settings()
    configure_logging(settings.telemetry)
    vision = settings.vision
    address = ServeAddress(
        host=host or vision.serve_host,
        http_port=http_port or vision.serve_http_port,
        grpc_port=grpc_port or vision.serve_grpc_port,
        metrics_port=metrics_port or vision.serve_metrics_port,
    )
    for port in (address.http_port, address.grpc_port, address.metrics_port):
        _check_port_free(address.host, port)
    try:
        manifests = servable(load_manifests(vision.models_dir), model or ())
    except ManifestError as exc:
        raise _fail(str(exc)) from None
    if importlib.util.find_spec("pytriton") is None:
        raise _fail(
            "the inference service needs PyTriton: pip install -r requirements-serve.txt "
            "&& pip install --no-deps nvidia-pytriton==0.7.0"
        )
    stub_env = vision.serve_stub_env or settings.data_dir / "triton-stub"
    try:
        serve(
            manifests,
            address,
            stub_env=stub_env,
            workspaces=settings.data_dir / "triton-workspaces",
            device=vision.device,
            threads=vision.worker_threads(),
        )
    except ManifestError as exc:
        raise _fail(str(exc)) from None


@app.command()
def migrate() -> None:
    """Apply pending database migrations (to the embedded database when no URL is set)."""
    settings = _settings()
    configure_logging(settings.telemetry)
    url = settings.database.url.get_secret_value() if settings.database.url else None
    services = resolve_services(settings.data_dir, url, None, want_redis=False)
    try:
        assert services.database_url is not None
        _run_checked(_migrate(services.database_url, settings))
    finally:
        services.stop()


@app.command()
def version() -> None:
    """Print the version."""
    out.print(__version__)


models_app = _Typer(
    help="The vision models this server serves (no subcommand: the README's table), and the "
    "model registry: versions, traffic policies, pins."
)
app.add_typer(models_app, name="models")


@models_app.callback(invoke_without_command=True)
def models(ctx: typer.Context) -> None:
    """Print the vision models this server serves, as the README's Markdown table: each
    manifest's name, version, task, runtime, source, licence, checked sha256 and size, and
    Tesseract (the OCR engine of the server process). Subcommands manage the model registry."""
    if ctx.invoked_subcommand is not None:
        return
    from backend.inference.manifest import load_manifests, model_table

    settings = _settings()
    extra = []
    [tesseract] = [m for m in PACKAGED_MODELS if m.name == "tesseract"]
    if tesseract.installed():
        # the engine and its language data are Debian's: their version and size vary by host
        package = f"tesserocr=={importlib.metadata.version('tesserocr')}"
        extra.append(
            (
                "`tesseract`",
                f"{tesseract.version} (the system's)",
                tesseract.task.value,
                "tesserocr (server threads)",
                f"`{package}`, Debian's `tesseract-ocr-eng` (language data)",
                "Apache-2.0",
                "not pinned (Debian package)",
                "about 4 MB (eng, fast)",
            )
        )
    typer.echo(model_table(load_manifests(settings.vision.models_dir), extra))


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


async def _service_checks(database_url: str, redis_url: str, settings: Settings) -> list[Check]:
    checks: list[Check] = []
    db = Database.connect(database_url, settings.database)
    try:
        await db.ping(settings.database.connect_timeout_s)
        facts = await db.facts()
        checks.append(Check("PostgreSQL", True, facts.version))
        if facts.pgvector_installed:
            checks.append(Check("pgvector", True, f"{facts.pgvector_installed} installed"))
        elif facts.pgvector_available:
            checks.append(
                Check(
                    "pgvector",
                    True,
                    f"{facts.pgvector_available} available; the first migration installs it",
                )
            )
        else:
            checks.append(Check("pgvector", False, "extension not available on this server"))
        checks.append(_migrations_check(await current_revisions(db.engine), settings))
    except DatabaseUnreachable as exc:
        checks.append(Check("PostgreSQL", False, str(exc)))
    finally:
        await db.dispose()

    client = connect_redis(redis_url, settings.redis)
    try:
        await ping_redis(client, settings.redis.connect_timeout_s)
        info = await client.info("server")
        name = "valkey" if "valkey_version" in info else "redis"
        checks.append(
            Check("Redis", True, f"{name} {info.get('valkey_version') or info['redis_version']}")
        )
    except RedisUnreachable as exc:
        checks.append(Check("Redis", False, str(exc)))
    finally:
        await client.aclose()
    return checks


def _migrations_check(current: frozenset[str], settings: Settings) -> Check:
    """Behind the code (a fresh data dir is at nothing) is not a fault when `serve` migrates
    at start, as it does on the embedded database: the doctor says whether the server will
    run, and it will. It is one when nothing will migrate, or the database is newer."""
    heads = head_revisions()
    at, wants = ",".join(sorted(current)) or "nothing", ",".join(sorted(heads))
    detail = f"at {at}, code wants {wants}"
    if current == heads:
        return Check("migrations", True, detail)
    if not current <= known_revisions():
        return Check(
            "migrations", False, f"{detail}: the database was migrated by newer code (upgrade)"
        )
    if settings.should_migrate_on_start:
        return Check(
            "migrations",
            True,
            f"{detail}: `sightline serve` applies them at start (`sightline migrate` now)",
        )
    return Check(
        "migrations",
        False,
        f"{detail}: run `sightline migrate` (SIGHTLINE_DATABASE_MIGRATE_ON_START is off)",
    )


def _manifest_checks(settings: Settings) -> list[Check]:
    """Each vision model's manifest: its weights are there and match their sha256 (else the
    pool does not serve it, and says why in `visionModels`)."""
    from backend.inference.manifest import ManifestError, load_manifests

    try:
        manifests = load_manifests(settings.vision.models_dir)
    except (ManifestError, OSError, ValueError) as exc:
        return [Check("vision manifests", False, str(exc), required=False)]
    checks = []
    for manifest in manifests:
        try:
            manifest.verify()
        except ManifestError as exc:
            checks.append(Check(f"weights {manifest.name}", False, str(exc), required=False))
        else:
            files = manifest.model_files()
            detail = "present (no sha256 to check)"
            if files and all(sha256 for _, _, sha256 in files):
                detail = "sha256 matches" + (f" ({len(files)} files)" if len(files) > 1 else "")
            if not files:
                detail = "no weights file"
            checks.append(Check(f"weights {manifest.name}", True, detail, required=False))
    return checks


def _gpu_check() -> Check:
    try:
        import torch  # optional: only the inference pool needs it
    except ImportError:
        return Check("GPU", False, "torch not installed (CPU inference only)", required=False)
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return Check("GPU", True, ", ".join(names), required=False)
    return Check("GPU", False, f"none visible to torch {torch.__version__}", required=False)


@app.command()
def doctor() -> None:
    """Check the database, pgvector, Redis, OCR data, packaged models and GPU; print a table."""
    settings = _settings()
    configure_logging(settings.telemetry.model_copy(update={"log_level": "WARNING"}))
    db_url = settings.database.url.get_secret_value() if settings.database.url else None
    redis_url = settings.redis.url.get_secret_value() if settings.redis.url else None
    checks = [Check("Python", True, f"{platform.python_version()} ({sys.executable})")]
    try:
        services = resolve_services(settings.data_dir, db_url, redis_url)
    except Exception as exc:  # report it in the table like every other failed check
        checks.append(Check("embedded services", False, str(exc).splitlines()[0]))
    else:
        try:
            assert services.database_url
            assert services.redis_url
            checks += asyncio.run(
                _service_checks(services.database_url, services.redis_url, settings)
            )
        finally:
            services.stop()
    tessdata = TESSDATA_DIR / "eng.traineddata"
    checks.append(
        Check(
            "tessdata",
            tessdata.exists(),
            str(tessdata)
            if tessdata.exists()
            else f"missing {tessdata} (apt-get install tesseract-ocr-eng)",
            required=False,
        )
    )
    for model in PACKAGED_MODELS:
        installed = model.installed()
        checks.append(
            Check(
                f"model {model.name}",
                installed,
                f"{model.task.value} from {model.package}"
                + ("" if installed else " (not installed)"),
                required=False,
            )
        )
    checks += _manifest_checks(settings)
    checks.append(_gpu_check())

    table = Table(title=f"sightline {__version__} doctor")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for check in checks:
        status = (
            "[green]ok[/green]"
            if check.ok
            else ("[red]FAIL[/red]" if check.required else "[yellow]missing[/yellow]")
        )
        table.add_row(check.name, status, check.detail)
    out.print(table)
    if any(not c.ok and c.required for c in checks):
        raise typer.Exit(1)


def _schema_paths() -> tuple[Callable[[], str], Path]:
    from backend.app import SCHEMA_FILE, schema_sdl

    return schema_sdl, SCHEMA_FILE


def _evolution() -> Any:
    from backend.app import schema_evolution

    return schema_evolution


@schema_app.command("export")
def schema_export(
    path: Annotated[Path | None, typer.Option(help="Where to write it.")] = None,
) -> None:
    """Write the SDL of the code's schema to schema.graphql."""
    sdl, default = _schema_paths()
    target = path or default
    target.write_text(sdl(), encoding="utf-8")
    out.print(f"wrote {target}")


def _stale_schema_file(expected: str, target: Path) -> bool:
    actual = target.read_text(encoding="utf-8") if target.exists() else ""
    if actual == expected:
        out.print(f"{target} is up to date")
        return False
    diff = difflib.unified_diff(
        actual.splitlines(keepends=True),
        expected.splitlines(keepends=True),
        fromfile=str(target),
        tofile="schema from code",
    )
    sys.stderr.writelines(diff)
    err.print(
        f"[red]error:[/red] {target} is stale: run `sightline schema export`",
        highlight=False,
        soft_wrap=True,
    )
    return True


def _breaks_the_release(expected: str, baseline: Path, changelog: Path) -> bool:
    """Prints the code's schema against the last release; True when that must fail CI."""
    evolution = _evolution()
    for needed in (baseline, changelog):
        if not needed.is_file():
            err.print(
                f"[red]error:[/red] {escape(str(needed))} is missing (it comes with the "
                "repository; `sightline schema release` writes it)",
                highlight=False,
                soft_wrap=True,
            )
            return True
    log = evolution.read_changelog(changelog.read_text(encoding="utf-8"))
    try:
        result = evolution.compare(expected, baseline.read_text(encoding="utf-8"), log)
    except evolution.UnreadableSchema as exc:
        err.print(
            f"[red]error:[/red] {escape(str(baseline))}: {escape(str(exc))}",
            highlight=False,
            soft_wrap=True,
        )
        return True
    release = log.latest or "unknown"
    for description in result.dangerous:
        err.print(
            f"[yellow]warning:[/yellow] dangerous change against release {release} (clients "
            f"may see values they do not expect): {escape(description)}",
            highlight=False,
            soft_wrap=True,
        )
    for description in result.unmatched:
        err.print(
            f"[yellow]warning:[/yellow] {changelog.name} announces a breaking change that is "
            f"not there: {escape(description)}",
            highlight=False,
            soft_wrap=True,
        )
    for description in result.announced:
        out.print(f"announced breaking change: {description}", markup=False, soft_wrap=True)
    failed = False
    mismatch = evolution.version_mismatch(log)
    if mismatch:
        err.print(f"[red]error:[/red] {escape(mismatch)}", highlight=False, soft_wrap=True)
        failed = True
    if result.breaking:
        listed = "\n".join(f"  {escape(d)}" for d in result.breaking)
        lines = "\n".join(f"- `{escape(d)}`" for d in result.breaking)
        err.print(
            f"[red]error:[/red] {len(result.breaking)} breaking change(s) against release "
            f"{release} ({escape(str(baseline))}):\n{listed}\n"
            "GraphQL evolves by addition: keep the old field, argument or value and mark it "
            "@deprecated(reason: ...) until the removal window is over (README, API "
            f"versioning). To break clients on purpose, announce each change in {changelog.name} "
            f"under '## {evolution.UNRELEASED}' / '### {evolution.BREAKING}':\n{lines}",
            highlight=False,
            soft_wrap=True,
        )
        failed = True
    if not failed:
        out.print(f"the schema keeps every operation of release {release} working")
    return failed


@schema_app.command("check")
def schema_check(
    path: Annotated[Path | None, typer.Option(help="The file to compare.")] = None,
    baseline: Annotated[
        Path | None, typer.Option(help="The last released schema (schema/released.graphql).")
    ] = None,
    changelog: Annotated[
        Path | None, typer.Option(help="The changelog that announces breaking changes.")
    ] = None,
) -> None:
    """Fail when schema.graphql is stale or the schema breaks the last release unannounced.

    Exit 1 with a diff when schema.graphql differs from the code's schema, and with the list of
    changes when the code's schema breaks schema/released.graphql in a way CHANGELOG.md does
    not announce. Dangerous changes are warnings.
    """
    sdl, default = _schema_paths()
    evolution = _evolution()
    expected = sdl()
    stale = _stale_schema_file(expected, path or default)
    broken = _breaks_the_release(
        expected,
        baseline or evolution.RELEASED_SCHEMA_FILE,
        changelog or evolution.CHANGELOG_FILE,
    )
    if stale or broken:
        raise typer.Exit(1)


@schema_app.command("release")
def schema_release(
    version: Annotated[
        str | None, typer.Option(help="The release's name (default: today, YYYY-MM-DD).")
    ] = None,
) -> None:
    """Make the code's schema the released one (refused while a break is unannounced).

    Writes schema/released.graphql, turns CHANGELOG.md's Unreleased section into the release's
    section and sets serverInfo.apiVersion to the release's name.
    """
    sdl, _ = _schema_paths()
    evolution = _evolution()
    name = version or evolution.next_release_name(evolution.API_VERSION, datetime.now(UTC).date())
    try:
        evolution.release(name, sdl())
    except evolution.ReleaseRefused as exc:
        raise _fail(escape(str(exc))) from None
    out.print(
        f"released the GraphQL API as {name}: wrote {evolution.RELEASED_SCHEMA_FILE}, "
        f"{evolution.CHANGELOG_FILE} and {evolution.VERSION_FILE}"
    )


@app.command()
def config() -> None:
    """Print every setting with its default and meaning (Markdown)."""
    out.print(settings_table(), markup=False, highlight=False, soft_wrap=True)


# -- identity administration ---------------------------------------------------------------

users_app = _Typer(help="Tenants' users.", no_args_is_help=True)
keys_app = _Typer(help="API keys and token signing keys.", no_args_is_help=True)
app.add_typer(users_app, name="users")
app.add_typer(keys_app, name="keys")


@asynccontextmanager
async def _auth(settings: Settings) -> AsyncIterator[AuthService]:
    async with _backends(settings) as (_db, _redis, auth):
        yield auth


@asynccontextmanager
async def _backends(settings: Settings) -> AsyncIterator[tuple[Database, Redis, AuthService]]:
    """The configured (or embedded) database and Redis, and an AuthService on them."""
    from backend.app import build_signer

    db_url = settings.database.url.get_secret_value() if settings.database.url else None
    redis_url = settings.redis.url.get_secret_value() if settings.redis.url else None
    services = await asyncio.to_thread(resolve_services, settings.data_dir, db_url, redis_url)
    assert services.database_url
    assert services.redis_url
    db = Database.connect(services.database_url, settings.database)
    redis = connect_redis(services.redis_url, settings.redis)
    try:
        await db.ping(settings.database.connect_timeout_s)
        if settings.should_migrate_on_start:
            await upgrade_to_head(db.engine)
        signer = build_signer(settings)
        async with db.session() as session:
            await signer.load(session)
        keys = KeySpace(settings.redis.key_prefix)
        yield db, redis, AuthService(db, signer, redis, keys, settings.auth)
    finally:
        await redis.aclose()
        await db.dispose()
        await asyncio.to_thread(services.stop)


def _run_admin(work: Callable[[AuthService], Awaitable[None]]) -> None:
    settings = _settings()
    configure_logging(settings.telemetry.model_copy(update={"log_level": "WARNING"}))

    async def main() -> None:
        async with _auth(settings) as auth:
            await work(auth)

    _run_reported(main)


def _run_reported(main: Callable[[], Awaitable[None]]) -> None:
    """Runs `main`: unreachable backends and expected errors are one line, not a traceback."""
    try:
        asyncio.run(main())  # type: ignore[arg-type]
    except (DatabaseUnreachable, RedisUnreachable) as exc:
        raise _fail(str(exc)) from None
    except AppError as exc:
        raise _fail(f"{exc.code}: {exc.message}") from None


@users_app.command("create")
def users_create(
    tenant: Annotated[str, typer.Option(help="Tenant slug (created when missing).")],
    email: Annotated[str, typer.Option(help="Email, the sign-in name.")],
    role: Annotated[UserRole, typer.Option(help="Role in the tenant.")] = UserRole.MEMBER,
    password_file: Annotated[
        Path | None, typer.Option(help="Read the password from this file (else prompted).")
    ] = None,
) -> None:
    """Create a user (and the tenant when it does not exist yet)."""
    if password_file is not None:
        password = password_file.read_text(encoding="utf-8").strip()
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)

    async def work(auth: AuthService) -> None:
        row = await auth.ensure_tenant(tenant, tenant)
        user = await auth.create_user(tenant_id=row.id, email=email, password=password, role=role)
        out.print(f"created {user.email} ({role.value}) in tenant {tenant}: {user.id}")

    _run_admin(work)


@users_app.command("disable")
def users_disable(
    tenant: Annotated[str, typer.Option(help="Tenant slug.")],
    email: Annotated[str, typer.Option(help="The user's email.")],
) -> None:
    """Disable a user: their tokens, API keys and open streams end at once, on every replica."""
    _set_active(tenant, email, active=False)


@users_app.command("enable")
def users_enable(
    tenant: Annotated[str, typer.Option(help="Tenant slug.")],
    email: Annotated[str, typer.Option(help="The user's email.")],
) -> None:
    """Enable a disabled user again (they sign in anew)."""
    _set_active(tenant, email, active=True)


@users_app.command("reset-password")
def users_reset_password(
    tenant: Annotated[str, typer.Option(help="Tenant slug.")],
    email: Annotated[str, typer.Option(help="The user's email.")],
    password_file: Annotated[
        Path | None, typer.Option(help="Read the new password from this file.")
    ] = None,
) -> None:
    """Set a user's password and end their sessions (on every replica); API keys stay valid.

    The password is prompted for, or read from the first line of stdin when it is not a
    terminal, or from --password-file: never from the command line, where `ps` shows it."""
    password = _new_password(password_file)

    async def work(auth: AuthService) -> None:
        user = await auth.reset_password(tenant, email, password)
        out.print(f"password of {user.email} in tenant {tenant} reset; their sessions ended")

    _run_admin(work)


def _new_password(password_file: Path | None) -> str:
    if password_file is not None:
        lines = password_file.read_text(encoding="utf-8").splitlines()
    elif not sys.stdin.isatty():
        lines = sys.stdin.read().splitlines()
    else:
        return str(typer.prompt("New password", hide_input=True, confirmation_prompt=True))
    password = lines[0].strip() if lines else ""
    if not password:
        raise _fail("no password given (an empty first line)")
    return password


def _set_active(tenant: str, email: str, *, active: bool) -> None:
    async def work(auth: AuthService) -> None:
        user = await auth.set_active_by_email(tenant, email, active)
        out.print(f"{'enabled' if active else 'disabled'} {user.email} in tenant {tenant}")

    _run_admin(work)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant slug.")],
    email: Annotated[str, typer.Option(help="The user the key acts for.")],
    name: Annotated[str, typer.Option(help="A name to recognise the key by.")],
    scope: Annotated[
        list[str] | None, typer.Option(help="Scopes (repeat); default: all of the user's.")
    ] = None,
    expires_in_days: Annotated[int | None, typer.Option(help="Lifetime in days.")] = None,
) -> None:
    """Create an API key for a user; the key is printed once."""

    async def work(auth: AuthService) -> None:
        principal = await auth.principal_for(tenant, email)
        created = await auth.create_api_key(principal, name, scope, expires_in_days)
        err.print(f"key {created.key.prefix} for {email}; store it now, it is not kept:")
        out.print(created.secret, highlight=False)

    _run_admin(work)


INGESTIBLE = (".md", ".markdown", ".txt", ".rst", ".html", ".htm", ".pdf")
IMAGES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")  # read by OCR when vision is on


@app.command()
def ingest(
    paths: Annotated[
        list[Path], typer.Argument(help="Files, or folders (searched for documents).")
    ],
    tenant: Annotated[str, typer.Option(help="Tenant slug.")],
    email: Annotated[str, typer.Option(help="The user the documents are ingested as.")],
    metadata: Annotated[
        str | None, typer.Option(help='JSON object stored with each document, e.g. {"team": "a"}.')
    ] = None,
    concurrency: Annotated[
        int,
        typer.Option(
            min=1,
            max=256,
            help="Documents sent at a time (small documents share the embedder's batches "
            "and the store's transactions).",
        ),
    ] = 16,
) -> None:
    """Ingest documents into a tenant's knowledge base, with a progress bar per document.

    A document's key (`source`) is its file name, as for an upload; inside a folder named here,
    its path from that folder (`guide/intro.md`). The same key again replaces the document (or
    does nothing when it has not changed). Up to `--concurrency` documents are in flight at
    once, each read from disk when its turn comes."""
    from backend.knowledge.embeddings import build_embedder
    from backend.vision.ocr import OcrEngine  # heavy imports (OpenCV): only for this command
    from backend.vision.service import VisionService

    meta = json.loads(metadata) if metadata else {}
    if not isinstance(meta, dict):
        raise _fail("--metadata must be a JSON object")
    settings = _settings()
    files = _documents(paths, images=settings.vision.enabled)
    if not files:
        raise _fail("no documents found")
    _refuse_shared_sources(files)
    configure_logging(settings.telemetry.model_copy(update={"log_level": "WARNING"}))
    failed = 0

    async def main() -> None:
        nonlocal failed
        async with _backends(settings) as (db, redis, auth):
            principal = await auth.principal_for(tenant, email)
            limits = settings.limits.model_copy(update={"enabled": False})  # an operator's run
            keys = KeySpace(settings.redis.key_prefix)
            limiter = RateLimiter(redis, keys, limits)
            ocr = OcrEngine(settings.vision.tessdata, settings.vision.ocr_threads)
            vision = VisionService(  # its OCR pipeline reads images and scanned pages
                db=db,
                redis=redis,
                keys=keys,
                inference=None,
                ocr=ocr,
                limiter=limiter,
                settings=settings.vision,
            )
            service = KnowledgeService(
                db=db,
                redis=redis,
                keys=keys,
                embedder=build_embedder(settings.knowledge),
                limiter=limiter,
                settings=settings.knowledge,
                read_image=vision.read_text if settings.vision.enabled else None,
            )
            registry = ModelRegistryService(
                db=db,
                redis=redis,
                keys=keys,
                settings=settings.lifecycle,
                auth=auth,
                operator_tenant=settings.privacy.operator_tenant,
            )
            # the embedding version search uses now (a promoted one once re-embedded)
            await service.versions.follow(await registry.snapshot())
            # the jobs' usage records carry their price (no budget is charged: limits are off)
            service.embedded = _priced_embeddings(settings, service.embedder.name)
            service.start(take_over=False)  # renews its own jobs' leases; others' are not its
            try:
                failed = await _ingest_all(service, principal, files, meta, concurrency)
            finally:
                await service.close(5)
                await vision.events.close()
                ocr.close()

    try:
        asyncio.run(main())
    except (DatabaseUnreachable, RedisUnreachable) as exc:
        raise _fail(str(exc)) from None
    except AppError as exc:
        raise _fail(f"{exc.code}: {exc.message}") from None
    out.print(f"{len(files) - failed} of {len(files)} documents ingested")
    if failed:
        raise typer.Exit(1)


def _priced_embeddings(settings: Settings, name: str) -> EmbeddingSpent:
    """Prices an embedding call of `sightline ingest` as the server does (the settings' price
    for the embedder's device), with no budget charged and no serving figures."""
    from backend.lifecycle.policy import split_pin
    from backend.lifecycle.seeding import FIRST_VERSION
    from backend.limits.pricing import REMOTE, ComputePricing

    pricing = ComputePricing(settings.cost.compute_second_prices)
    model, version = split_pin(name)
    device = REMOTE if settings.knowledge.embedding_base_url else "cpu"

    async def priced(
        tenant_id: uuid.UUID,
        seconds: float,
        principal: Principal | None,
        subject: str,
        embedder: object = None,
    ) -> UsagePart:
        return pricing.embedding(tenant_id, model, version or FIRST_VERSION, seconds, device)

    return priced


def _documents(paths: list[Path], *, images: bool) -> list[tuple[Path, str]]:
    """The files named, and the documents (by extension) inside the folders named (images too
    when they can be read: OCR), each with its source key: the file name, as an upload has, or
    the path from the folder named, so that two `intro.md` in a tree stay two documents."""
    suffixes = INGESTIBLE + (IMAGES if images else ())
    found: dict[Path, str] = {}
    for path in paths:
        if path.is_file():
            found.setdefault(path.resolve(), path.name)
        elif path.is_dir():
            for file in sorted(path.rglob("*")):
                if file.suffix.lower() in suffixes and file.is_file():
                    found.setdefault(file.resolve(), file.relative_to(path).as_posix())
    return sorted(found.items())


def _refuse_shared_sources(files: list[tuple[Path, str]]) -> None:
    """Two files with one key would replace each other: refused before anything is ingested."""
    by_source: dict[str, list[Path]] = {}
    for path, source in files:
        by_source.setdefault(source, []).append(path)
    for source, shared in by_source.items():
        if len(shared) > 1:
            raise _fail(
                f"{len(shared)} documents would have the source {source!r} and replace each "
                f"other: {', '.join(map(str, shared))} (ingest a folder that holds them all)"
            )


async def _ingest_all(
    service: KnowledgeService,
    principal: Principal,
    files: list[tuple[Path, str]],
    meta: dict,
    concurrency: int,
) -> int:
    """Ingests `files` (path, source), `concurrency` at a time, a progress bar each; returns
    how many failed."""
    turns = asyncio.Semaphore(concurrency)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=err) as progress:

        async def one(path: Path, source: str) -> bool:
            async with turns:
                return await _ingest_one(service, principal, path, source, meta, progress)

        tasks = [asyncio.create_task(one(path, source)) for path, source in files]
        try:
            done = await asyncio.gather(*tasks)
        finally:  # one raised (or Ctrl-C): the others stop before the service closes
            await cancel_and_wait(tasks)
    return done.count(False)


async def _ingest_one(  # noqa: PLR0917 (one document and where it goes)
    service: KnowledgeService,
    principal: Principal,
    path: Path,
    source: str,
    meta: dict,
    progress: Progress,
) -> bool:
    bar = progress.add_task(source, total=None)
    data = await asyncio.to_thread(path.read_bytes)
    try:
        job = await service.ingest(principal, data, filename=path.name, source=source, meta=meta)
    except AppError as exc:
        progress.update(bar, description=f"{source}: {exc.code}")
        return False
    async for event in await service.job_events(principal, job.id, None):
        data = event.data
        if "total" in data:
            progress.update(bar, total=data["total"], completed=data["done"])
        if event.type == "IngestionCompleted":
            progress.update(bar, description=f"{source}: {data['status']}")
        elif event.type == "IngestionFailed":
            progress.update(bar, description=f"{source}: {data['code']} {data['message']}")
            return False
    return True


@keys_app.command("rotate-signing")
def keys_rotate_signing() -> None:
    """Start signing access tokens with a new key; old tokens stay valid until they expire."""

    async def work(auth: AuthService) -> None:
        kid = await auth.rotate_signing_key()
        out.print(f"now signing with {kid}; replicas pick it up at the first token naming it")

    _run_admin(work)


# -- data protection -----------------------------------------------------------------------

privacy_app = _Typer(
    help="Data protection: retention, purges, erasure, exports (all audited).",
    no_args_is_help=True,
)
app.add_typer(privacy_app, name="privacy")

DAYS_HELP = "Days to keep; `forever` keeps them; unset: unchanged."
Days = Annotated[str | None, typer.Option(help=DAYS_HELP, metavar="DAYS|forever")]


def _days(name: str, value: str | None) -> dict[str, int | None]:
    if value is None:
        return {}
    if value.strip().lower() in {"forever", "none", "never"}:
        return {name: None}
    try:
        return {name: int(value)}
    except ValueError:
        raise _fail(f"--{name.replace('_', '-')} must be a number of days or `forever`") from None


def _run_privacy(work: Callable[[PrivacyService, AuthService], Awaitable[None]]) -> None:
    """Runs `work` on a PrivacyService over the configured (or embedded) backends."""
    from backend.agents.checkpoint import RedisCheckpointSaver
    from backend.privacy.service import Streams
    from backend.realtime.eventlog import RunEventLog

    settings = _settings()
    configure_logging(settings.telemetry.model_copy(update={"log_level": "WARNING"}))

    async def main() -> None:
        async with _backends(settings) as (db, redis, auth):
            keys = KeySpace(settings.redis.key_prefix)
            # The same logs and memory as the server's (key names by construction).
            streams = Streams(
                runs=RunEventLog(redis, keys),
                ingestion=RunEventLog(redis, keys.child("kb")),
                vision=RunEventLog(redis, keys.child("vision")),
            )
            service = PrivacyService(
                db=db,
                redis=redis,
                keys=keys,
                # an operator waits for the outcome (runs on servers get time to stop)
                settings=settings.privacy.model_copy(update={"erasure_wait_s": 24 * 3600.0}),
                secret=settings.security.secret_key.get_secret_value(),
                auth=auth,
                streams=streams,
                memory=RedisCheckpointSaver(redis, keys.child("agent")),
            )
            try:
                await work(service, auth)
            finally:
                await service.close(5)

    _run_reported(main)


async def _tenant_id(auth: AuthService, slug: str) -> uuid.UUID:
    tenant = await auth.tenant_by_slug(slug)
    if tenant is None:
        raise _fail(f"no tenant {slug!r}")
    return tenant.id


def _print_removed(erasure: Erasure) -> None:
    counts = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in erasure.removed.as_dict().items())
    out.print(
        f"{erasure.status.value}: {erasure.subject}" + (f" ({counts})" if counts else ""),
        soft_wrap=True,
        highlight=False,
    )
    if erasure.status is ErasureStatus.PENDING:
        err.print("runs are still going: run the command again, or a server's purge finishes it")


@privacy_app.command("policy")
def privacy_policy(  # noqa: PLR0917 (one option per kind of data)
    tenant: Annotated[str, typer.Option(help="Tenant slug.")],
    messages_days: Days = None,
    documents_days: Days = None,
    vision_days: Days = None,
    events_days: Days = None,
    audit_days: Days = None,
    store_messages_redacted: Annotated[
        bool | None,
        typer.Option(
            "--store-messages-redacted/--store-messages-as-sent",
            help="Store users' messages with personal data replaced. Unset: unchanged.",
        ),
    ] = None,
    reset: Annotated[bool, typer.Option(help="Back to the server's defaults first.")] = False,
) -> None:
    """Show a tenant's data protection policy, or change it (audited)."""
    retention = {
        **_days("messages_days", messages_days),
        **_days("documents_days", documents_days),
        **_days("vision_days", vision_days),
        **_days("events_days", events_days),
        **_days("audit_days", audit_days),
    }
    change: dict[str, object] = {"retention": retention} if retention else {}
    if store_messages_redacted is not None:
        change["store_messages_redacted"] = store_messages_redacted

    async def work(service: PrivacyService, auth: AuthService) -> None:
        tenant_id = await _tenant_id(auth, tenant)
        if change or reset:
            policy = await service.update_policy(
                tenant_id, change, actor_id=None, replace=reset, via="cli"
            )
        else:
            policy = await service.policy(tenant_id)
        out.print_json(policy.model_dump_json())

    _run_privacy(work)


@privacy_app.command("purge")
def privacy_purge(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant (slug).")] = None,
) -> None:
    """Delete what is past retention now (and finish interrupted erasures)."""

    async def work(service: PrivacyService, auth: AuthService) -> None:
        tenant_id = await _tenant_id(auth, tenant) if tenant else None
        removed = await service.purge(tenant_id)
        counts = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in removed.as_dict().items())
        out.print(f"purged: {counts or 'nothing past retention'}", soft_wrap=True, highlight=False)

    _run_privacy(work)


@privacy_app.command("erase-user")
def privacy_erase_user(
    tenant: Annotated[str, typer.Option(help="Tenant slug.")],
    email: Annotated[str, typer.Option(help="The user to erase.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Erase a user and their data (usage kept anonymised, audit under a pseudonym)."""
    if not yes:
        typer.confirm(f"Erase {email} from {tenant} and all their data?", abort=True)

    async def work(service: PrivacyService, auth: AuthService) -> None:
        principal = await auth.principal_for(tenant, email)
        erasure = await service.erase_user(None, principal.tenant_id, principal.user_id, via="cli")
        _print_removed(erasure)

    _run_privacy(work)


@privacy_app.command("erase-tenant")
def privacy_erase_tenant(
    tenant: Annotated[str, typer.Option(help="Tenant slug.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Erase a tenant with all its users and data."""
    if not yes:
        typer.confirm(f"Erase tenant {tenant} and everything in it?", abort=True)

    async def work(service: PrivacyService, auth: AuthService) -> None:
        _print_removed(await service.erase_tenant(None, await _tenant_id(auth, tenant), via="cli"))

    _run_privacy(work)


@privacy_app.command("export")
def privacy_export(
    tenant: Annotated[str, typer.Option(help="Tenant slug.")],
    email: Annotated[str, typer.Option(help="The user whose data to export.")],
    output: Annotated[
        Path | None, typer.Option(help="Write the JSON archive here (default: stdout).")
    ] = None,
) -> None:
    """Export a user's data as a JSON archive (streamed)."""

    async def work(service: PrivacyService, auth: AuthService) -> None:
        principal = await auth.principal_for(tenant, email)
        pieces = await service.export_user(
            principal.tenant_id, principal.user_id, actor_id=None, via="cli"
        )
        target = await asyncio.to_thread(output.open, "wb") if output else sys.stdout.buffer
        try:
            async for piece in pieces:
                await asyncio.to_thread(target.write, piece)
        finally:
            if output:
                await asyncio.to_thread(target.close)
            else:
                target.flush()
        if output:
            err.print(f"wrote {output}")

    _run_privacy(work)


# -- the model registry ----------------------------------------------------------------------


def _run_registry(work: Callable[[ModelRegistryService, AuthService], Awaitable[None]]) -> None:
    """Runs `work` on the model registry over the configured (or embedded) backends, as an
    operator (the CLI holds the database's credentials): servers take the change in at once."""
    settings = _settings()
    configure_logging(settings.telemetry.model_copy(update={"log_level": "WARNING"}))

    async def main() -> None:
        async with _backends(settings) as (db, redis, auth):
            service = ModelRegistryService(
                db=db,
                redis=redis,
                keys=KeySpace(settings.redis.key_prefix),
                settings=settings.lifecycle,
                auth=auth,
                operator_tenant=settings.privacy.operator_tenant,
            )
            await work(service, auth)

    _run_reported(main)


def _print_policy(policy: TrafficPolicy) -> None:
    arms = ", ".join(f"{a.version} {a.weight:g}%" for a in policy.arms)
    shadow = f"; shadow {policy.shadow} at {policy.shadow_rate:g}" if policy.shadow else ""
    out.print(
        f"{policy.model} revision {policy.revision}: {arms} (sticky: {policy.sticky.value})"
        f"{shadow}",
        markup=False,
        highlight=False,
    )


@models_app.command("list")
def models_list() -> None:
    """The registry's models with their live version and traffic split."""

    async def work(service: ModelRegistryService, _: AuthService) -> None:
        table = Table(title="model registry")
        for column in ("model", "kind", "task", "live", "traffic", "revision"):
            table.add_column(column)
        for model in await service.models(None):
            policy = model.policy
            table.add_row(
                model.name,
                model.kind.value,
                model.task,
                policy.live if policy else "",
                ", ".join(f"{a.version} {a.weight:g}%" for a in policy.arms) if policy else "",
                str(policy.revision) if policy else "",
            )
        out.print(table)

    _run_registry(work)


@models_app.command("versions")
def models_versions(model: Annotated[str, typer.Argument(help="The model.")]) -> None:
    """A model's versions with their status."""

    async def work(service: ModelRegistryService, _: AuthService) -> None:
        found = await service.model(None, model)
        table = Table(title=f"{found.name} ({found.kind.value}, {found.task})")
        for column in ("version", "status", "sha256", "registered", "notes", "error"):
            table.add_column(column, overflow="fold")
        for version in found.versions:
            table.add_row(
                version.version,
                version.status,
                (version.sha256 or "")[:12],
                f"{version.registered_at:%Y-%m-%d %H:%M}" if version.registered_at else "",
                escape(version.notes),
                escape(version.error or ""),
            )
        out.print(table)
        for pin in found.pins:
            out.print(f"pinned: tenant {pin.tenant_id} -> {pin.version}", highlight=False)
        if found.kind is ModelKind.EMBEDDING:
            _print_reembedding(await read_state(service.db, found.name))

    _run_registry(work)


@models_app.command("spec")
def models_spec(
    model: Annotated[str, typer.Argument(help="The model.")],
    version: Annotated[str, typer.Argument(help="Its version.")],
) -> None:
    """Print a version's spec (its manifest or endpoint spec) as JSON, without its name and
    version: a file to edit and register as another version, of this model or of another
    (`sightline models spec rapidocr 3.10.0 > ocr.json`, then `models register tesseract
    rapidocr-3.10.0 --spec ocr.json`)."""

    async def work(service: ModelRegistryService, _: AuthService) -> None:
        found = await service.model(None, model)
        for candidate in found.versions:
            if candidate.version == version:
                spec = {k: v for k, v in candidate.spec.items() if k not in ("name", "version")}
                typer.echo(json.dumps(spec, indent=2))
                return
        raise VersionNotFound(f"{model} has no version {version!r}")

    _run_registry(work)


def _print_reembedding(state: Reembedding | None) -> None:
    """The knowledge base's side of an embedding model: what search uses, and the last
    re-embedding with its progress."""
    if state is None:
        out.print("knowledge base: not its embedder", highlight=False)
        return
    line = f"knowledge base: search uses {state.serving_version}"
    if state.status is not None:
        line += (
            f"; re-embedding to {state.target_version}: {state.status}, "
            f"{state.done} of {state.total} chunks"
        )
        if state.error:
            line += f" ({state.error})"
    out.print(line, markup=False, highlight=False)


@models_app.command("register")
def models_register(  # noqa: PLR0917 (one argument per field of a version)
    model: Annotated[str, typer.Argument(help="The model (new: give --kind).")],
    version: Annotated[str, typer.Argument(help="The new version.")],
    spec: Annotated[
        Path,
        typer.Option(
            help="JSON file: a model manifest (vision; relative paths are from its folder), "
            "an endpoint spec (chat, embedding) or a learned head (guardrail: the file "
            "`bench/guardrails.py --fit-head` writes)."
        ),
    ],
    kind: Annotated[str | None, typer.Option(help="vision, chat, embedding or guardrail.")] = None,
    task: Annotated[str | None, typer.Option(help="A new vision model's task.")] = None,
    sha256: Annotated[str | None, typer.Option(help="The weights' sha256, checked.")] = None,
    notes: Annotated[str, typer.Option(help="Why this version.")] = "",
) -> None:
    """Register a model version (a vision version's files are checked, then it loads)."""
    from backend.inference.manifest import ManifestError, ModelManifest

    try:
        data = json.loads(spec.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _fail(f"cannot read {spec}: {exc}") from None
    if not isinstance(data, dict):
        raise _fail(f"{spec} must hold a JSON object")
    if kind is not None and kind not in {k.value for k in ModelKind}:
        raise _fail("--kind must be one of " + ", ".join(k.value for k in ModelKind))
    if "runtime" in data:  # a manifest: its paths are relative to its file
        data.setdefault("name", model)
        data.setdefault("version", version)
        try:
            data = ModelManifest.from_dict(data, spec.resolve().parent).to_dict()
        except ManifestError as exc:
            raise _fail(escape(str(exc))) from None

    async def work(service: ModelRegistryService, _: AuthService) -> None:
        found = await service.register_version(
            None,
            model,
            version,
            spec=data,
            kind=ModelKind(kind) if kind else None,
            task=task,
            sha256=sha256,
            notes=notes,
        )
        out.print(f"registered {found.model}@{found.version}: {found.status}", highlight=False)

    _run_registry(work)


def _arm(text: str) -> Arm:
    version, equals, weight = text.rpartition("=")
    try:
        if not equals or not version:
            raise ValueError(text)
        return Arm(version, float(weight))
    except ValueError:
        raise _fail(f"--arm takes VERSION=WEIGHT (percent), not {text!r}") from None


@models_app.command("policy")
def models_policy(  # noqa: PLR0917 (one option per field of a policy)
    model: Annotated[str, typer.Argument(help="The model.")],
    arm: Annotated[
        list[str] | None,
        typer.Option(help="VERSION=WEIGHT, once per version; weights sum to 100."),
    ] = None,
    sticky: Annotated[str | None, typer.Option(help="user, tenant, conversation or none.")] = None,
    shadow: Annotated[str | None, typer.Option(help="A version to mirror traffic to.")] = None,
    shadow_rate: Annotated[float | None, typer.Option(help="Share mirrored, 0 to 1.")] = None,
    no_shadow: Annotated[bool, typer.Option(help="End the shadowing.")] = False,
    expected_revision: Annotated[
        int | None, typer.Option(help="Refuse if the policy has changed since this revision.")
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Kept with the policy's history.")] = None,
) -> None:
    """Show a model's traffic policy, or set it with --arm (what is not given is kept)."""
    from backend.lifecycle.policy import StickyKey
    from backend.lifecycle.service import KEEP

    if sticky is not None and sticky not in {k.value for k in StickyKey}:
        raise _fail("--sticky must be user, tenant, conversation or none")
    arms = [_arm(a) for a in arm or []]
    if not arms and (sticky or shadow or shadow_rate is not None or no_shadow):
        raise _fail("give the traffic split with --arm VERSION=WEIGHT")

    async def work(service: ModelRegistryService, _: AuthService) -> None:
        if not arms:
            found = await service.model(None, model)
            if found.policy is None:
                out.print(f"{model} has no traffic policy", highlight=False)
            else:
                _print_policy(found.policy)
            return
        policy = await service.set_traffic_policy(
            None,
            model,
            arms,
            sticky=StickyKey(sticky) if sticky else KEEP,
            shadow=None if no_shadow else (shadow or KEEP),
            shadow_rate=0.0 if no_shadow else (KEEP if shadow_rate is None else shadow_rate),
            expected_revision=expected_revision,
            reason=reason,
        )
        _print_policy(policy)

    _run_registry(work)


@models_app.command("promote")
def models_promote(
    model: Annotated[str, typer.Argument(help="The model.")],
    version: Annotated[str, typer.Argument(help="The ready version to give all traffic.")],
) -> None:
    """Give a ready version all the traffic; the previous one stays loaded for a rollback."""

    async def work(service: ModelRegistryService, _: AuthService) -> None:
        _print_policy(await service.promote_version(None, model, version))

    _run_registry(work)


@models_app.command("compare")
def models_compare(
    model: Annotated[str, typer.Argument(help="The model.")],
    window: Annotated[float, typer.Option(help="Seconds back from now.")] = 300.0,
) -> None:
    """Live and the other versions side by side over the last --window seconds, on every
    replica: requests, errors, latency, compute or tokens, cost, and the shadow's agreement."""
    settings = _settings()

    async def work(service: ModelRegistryService, _: AuthService) -> None:
        await _compare(service, settings, model, window)

    _run_registry(work)


async def _compare(
    service: ModelRegistryService, settings: Settings, model: str, window: float
) -> None:
    snapshot = await service.snapshot()
    series = Series(service.redis, KeySpace(settings.redis.key_prefix), settings.lifecycle)
    comparisons = ModelComparisons(
        ServingStats(series),
        ShadowLedger(series),
        _SnapshotPolicies(snapshot),
        max_window_s=settings.lifecycle.stats_retention_s,
    )
    found = await comparisons.compare(model, window)
    table = Table(title=f"{found.model}: the last {found.window_s:g} s")
    columns = "version role weight requests errors p50_ms p95_ms compute_s tokens cost agreement"
    for column in columns.split():
        table.add_column(column.replace("_", " "))
    for figures in found.versions:
        w, agreement = figures.window, figures.agreement
        table.add_row(
            w.version,
            figures.role.value,
            f"{figures.weight:g}%",
            str(w.requests),
            f"{w.errors} ({w.error_rate:.1%})",
            _ms(w.p50_s),
            _ms(w.p95_s),
            f"{w.compute_s:.2f}",
            str(w.tokens),
            f"{w.cost:.4f}",
            _agreement(agreement) if agreement is not None else "",
        )
    out.print(table)


@dataclass(frozen=True)
class _SnapshotPolicies:
    snapshot: RegistrySnapshot

    def policy(self, model: str) -> TrafficPolicy | None:
        return self.snapshot.policies.get(model)


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1000:.1f}"


def _agreement(agreement: ShadowAgreement) -> str:
    means = ", ".join(f"{name} {value:.3f}" for name, value in sorted(agreement.metrics.items()))
    return f"{means} over {agreement.compared} ({agreement.failed} failed)"


@models_app.command("rollback")
def models_rollback(
    model: Annotated[str, typer.Argument(help="The model.")],
    reason: Annotated[str | None, typer.Option(help="Kept with the policy's history.")] = None,
) -> None:
    """Go back to the model's previous traffic policy."""

    async def work(service: ModelRegistryService, _: AuthService) -> None:
        _print_policy(await service.rollback_model(None, model, reason=reason))

    _run_registry(work)


@models_app.command("retire")
def models_retire(
    model: Annotated[str, typer.Argument(help="The model.")],
    version: Annotated[str, typer.Argument(help="A version no traffic, shadow or pin reaches.")],
) -> None:
    """Retire a version: servers unload it; it stays on record."""

    async def work(service: ModelRegistryService, _: AuthService) -> None:
        found = await service.retire_version(None, model, version)
        out.print(f"{found.model}@{found.version}: {found.status}", highlight=False)

    _run_registry(work)


@models_app.command("pin")
def models_pin(
    model: Annotated[str, typer.Argument(help="The model.")],
    version: Annotated[
        str | None, typer.Argument(help="The version; left out with --unpin.")
    ] = None,
    tenant: Annotated[str, typer.Option(help="Tenant slug.")] = "",
    unpin: Annotated[bool, typer.Option(help="Remove the tenant's pin.")] = False,
) -> None:
    """Pin a version for a tenant (every request of the tenant gets it), or --unpin."""
    if not tenant:
        raise _fail("--tenant is required")
    if not unpin and version is None:
        raise _fail("name the version to pin (or --unpin)")

    async def work(service: ModelRegistryService, auth: AuthService) -> None:
        tenant_id = await _tenant_id(auth, tenant)
        if unpin:
            removed = await service.unpin_version(None, model, tenant_id=tenant_id)
            out.print(f"{tenant}: {'unpinned' if removed else 'no pin of'} {model}")
            return
        assert version is not None
        pin = await service.pin_version(None, model, version, tenant_id=tenant_id)
        out.print(f"{tenant}: {pin.model} pinned to {pin.version}", highlight=False)

    _run_registry(work)
