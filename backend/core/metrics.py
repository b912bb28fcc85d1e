"""Prometheus metrics for requests, GraphQL operations, WebSockets and subscriptions."""

from __future__ import annotations

import os
import re
import threading

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from backend import __version__

# Operation names come from clients: only well-formed ones become label values.
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
ANONYMOUS = "anonymous"
OTHER = "other"

# `_created` series double the output and no dashboard reads them.
disable_created_metrics()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def multiprocess_dir() -> str | None:
    """Set by `sightline serve --workers N`: every worker writes there and /metrics sums them."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """The metrics of one app instance, in a registry of its own (tests build many apps)."""

    def __init__(self, max_operation_names: int = 500) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.build_info = Gauge(
            "sightline_build_info",
            "Version of the running server.",
            ["version"],
            registry=r,
            multiprocess_mode="max",
        )
        self.build_info.labels(__version__).set(1)
        self.http_requests = Counter(
            "sightline_http_requests",
            "HTTP requests served.",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "sightline_http_request_duration_seconds",
            "HTTP request latency.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.graphql_operations = Counter(
            "sightline_graphql_operations",
            "GraphQL operations executed.",
            ["operation", "type", "outcome"],
            registry=r,
        )
        self.graphql_latency = Histogram(
            "sightline_graphql_operation_duration_seconds",
            "GraphQL operation latency (subscriptions: time to set up the stream).",
            ["operation", "type"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ws_connections_active = Gauge(
            "sightline_websocket_connections_active",
            "Open WebSocket connections.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.ws_connections = Counter(
            "sightline_websocket_connections",
            "WebSocket connections accepted.",
            registry=r,
        )
        self.subscriptions_active = Gauge(
            "sightline_graphql_subscriptions_active",
            "Running GraphQL subscriptions.",
            ["operation"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self._names: set[str] = set()
        self._max_names = max_operation_names
        self._lock = threading.Lock()

    def operation_label(self, name: str | None) -> str:
        """A bounded label value for a client-chosen operation name."""
        if not name:
            return ANONYMOUS
        if not _NAME_RE.match(name):
            return OTHER
        if name in self._names:
            return name
        with self._lock:
            if len(self._names) >= self._max_names:
                return OTHER
            self._names.add(name)
        return name

    def exposition(self) -> tuple[bytes, str]:
        """The text format for /metrics (summed over workers in multiprocess mode)."""
        if multiprocess_dir():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
