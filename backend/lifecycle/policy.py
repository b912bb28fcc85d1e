"""The model registry's state as every replica holds it, and how a request picks its version.

Pure: no database, no Redis, no clock. The registry service (`service.py`) builds a
`RegistrySnapshot` from PostgreSQL; each replica keeps the latest one and routes every request
with `route`, so the same request key lands on the same version on every replica and after a
restart (a stable hash, never Python's salted `hash`).

Precedence: an explicit pin in the request (`"name@version"`), then the tenant's pin, then the
policy's weighted split by the sticky key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum

BUCKETS = 10_000  # weights are percentages; a bucket is 0.01%


class ModelKind(StrEnum):
    VISION = "vision"
    CHAT = "chat"
    EMBEDDING = "embedding"
    GUARDRAIL = "guardrail"  # a guardrail's learned model (its weights are its spec)


class VersionStatus(StrEnum):
    REGISTERED = "registered"  # known, not loaded
    LOADING = "loading"  # replicas are loading and warming it
    READY = "ready"  # loaded and warm everywhere, no traffic yet
    LIVE = "live"
    CANARY = "canary"
    SHADOW = "shadow"
    FAILED = "failed"  # did not load or warm; the policy in force is unchanged
    RETIRED = "retired"  # unloaded; kept for the record


# versions a replica keeps loaded (the others are unloaded once drained)
LOADED = frozenset(
    {
        VersionStatus.LOADING,
        VersionStatus.READY,
        VersionStatus.LIVE,
        VersionStatus.CANARY,
        VersionStatus.SHADOW,
    }
)


class StickyKey(StrEnum):
    USER = "user"
    TENANT = "tenant"
    CONVERSATION = "conversation"
    NONE = "none"  # a fresh draw per request


@dataclass(frozen=True, slots=True)
class Arm:
    version: str
    weight: float  # percent; a policy's arms sum to 100


@dataclass(frozen=True, slots=True)
class CanaryGuard:
    """When the canary's figures break these against live over `window_s` (with at least
    `min_requests` on each side), the policy rolls back by itself."""

    max_error_rate_delta: float = 0.05  # canary error rate may exceed live's by this much
    max_p95_ratio: float = 1.5  # canary p95 latency at most this multiple of live's
    min_requests: int = 50
    window_s: float = 300.0
    # automatic ramp: the canary's next share (percent) after each clean window, e.g.
    # (5, 25, 50, 100); at 100 it is promoted. Empty: the operator steps the weights.
    ramp: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    model: str
    arms: tuple[Arm, ...]
    sticky: StickyKey = StickyKey.USER
    shadow: str | None = None  # a version that also runs, off the critical path
    shadow_rate: float = 0.0  # share of requests mirrored to it, 0..1
    canary: CanaryGuard | None = None
    revision: int = 0  # bumped on every change; replicas keep the highest they saw

    @property
    def live(self) -> str:
        """The arm with the largest weight (the first of equals): what serves when in doubt."""
        return max(self.arms, key=lambda a: a.weight).version


@dataclass(frozen=True, slots=True)
class ModelVersionRecord:
    model: str
    version: str
    kind: ModelKind
    task: str  # classification, detection, ocr, chat, embedding, injection
    status: VersionStatus
    spec: dict[str, object] = field(default_factory=dict)  # a manifest, or an endpoint spec
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class RegistrySnapshot:
    versions: dict[str, tuple[ModelVersionRecord, ...]] = field(default_factory=dict)
    policies: dict[str, TrafficPolicy] = field(default_factory=dict)
    pins: dict[tuple[str, str], str] = field(default_factory=dict)  # (tenant id, model) -> version
    revision: int = 0


@dataclass(frozen=True, slots=True)
class RequestKey:
    """Who asks: what a sticky policy hashes."""

    tenant_id: str
    user_id: str | None = None
    conversation_id: str | None = None
    request_id: str = ""  # StickyKey.NONE: a fresh draw per request

    def of(self, sticky: StickyKey) -> str:
        if sticky is StickyKey.TENANT:
            return self.tenant_id
        if sticky is StickyKey.CONVERSATION and self.conversation_id:
            return self.conversation_id
        if sticky is StickyKey.USER and self.user_id:
            return self.user_id
        return self.request_id or self.user_id or self.tenant_id


class RouteReason(StrEnum):
    REQUEST_PIN = "request_pin"
    TENANT_PIN = "tenant_pin"
    POLICY = "policy"
    DEFAULT = "default"  # no policy: the model's only (or configured) version


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    version: str
    reason: RouteReason
    shadow: str | None = None  # run this version too, after the answer, off its path


def split_pin(name: str) -> tuple[str, str | None]:
    """`"name@version"` -> ("name", "version"); `"name"` -> ("name", None)."""
    model, at, version = name.partition("@")
    return (model, version or None) if at else (name, None)


def bucket(model: str, key: str) -> int:
    """A stable bucket in [0, BUCKETS) for a sticky key: the same on every replica and run."""
    digest = hashlib.blake2b(f"{model}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def pick_arm(policy: TrafficPolicy, key: str) -> str:
    """The arm whose cumulative weight covers the key's bucket."""
    point = bucket(policy.model, key)
    edge = 0.0
    for arm in policy.arms:
        edge += arm.weight * BUCKETS / 100
        if point < edge:
            return arm.version
    return policy.live


def shadow_sampled(policy: TrafficPolicy, key: str) -> bool:
    """Whether this request is mirrored to the shadow (by its own bucket, not the arm's)."""
    if policy.shadow is None or policy.shadow_rate <= 0:
        return False
    return bucket(f"{policy.model}\x00shadow", key) < policy.shadow_rate * BUCKETS
