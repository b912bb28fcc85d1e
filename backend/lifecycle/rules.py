"""The rules of the registry, without the database: what a traffic policy may be, which
statuses the versions get from it, what a model and a version may be called, and which kind
and task a version has."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

from backend.core.models import ModelVersionRow
from backend.lifecycle.errors import (
    InvalidModelSpec,
    InvalidTrafficPolicy,
    VersionNotFound,
    VersionNotServable,
)
from backend.lifecycle.policy import CanaryGuard, ModelKind, TrafficPolicy, VersionStatus
from backend.lifecycle.schemas import MODEL_NAME, TASK_OF_KIND, VERSION_NAME, VISION_TASKS

# Versions traffic may reach (an arm, the shadow, a pin).
SERVABLE = frozenset(
    {VersionStatus.READY, VersionStatus.LIVE, VersionStatus.CANARY, VersionStatus.SHADOW}
)
_WEIGHT_TOLERANCE = 1e-6
MAX_RAMP_STEPS = 10  # steps of a canary's automatic ramp


def validate_policy(policy: TrafficPolicy, statuses: Mapping[str, VersionStatus]) -> None:
    """Raises the typed error of the first thing wrong with `policy` given the model's
    versions and their statuses."""
    if not policy.arms:
        raise InvalidTrafficPolicy("a policy needs at least one version with traffic")
    seen: set[str] = set()
    for arm in policy.arms:
        if arm.version in seen:
            raise InvalidTrafficPolicy(f"version {arm.version} is listed twice")
        seen.add(arm.version)
        if not math.isfinite(arm.weight) or not 0 < arm.weight <= 100:
            raise InvalidTrafficPolicy(
                f"weight of {arm.version} must be above 0 and at most 100", version=arm.version
            )
    total = sum(a.weight for a in policy.arms)
    if abs(total - 100) > _WEIGHT_TOLERANCE:
        raise InvalidTrafficPolicy(f"weights sum to {total:g}, not 100", total=total)
    if not math.isfinite(policy.shadow_rate) or not 0 <= policy.shadow_rate <= 1:
        raise InvalidTrafficPolicy("shadowRate must be between 0 and 1")
    if policy.shadow is None and policy.shadow_rate > 0:
        raise InvalidTrafficPolicy("shadowRate needs a shadow version")
    if policy.shadow is not None and policy.shadow in seen:
        raise InvalidTrafficPolicy(
            f"the shadow {policy.shadow} also takes live traffic; shadow a version without it"
        )
    for version in [*seen, *([policy.shadow] if policy.shadow else [])]:
        status = statuses.get(version)
        if status is None:
            raise VersionNotFound(f"no version {version} of {policy.model}", version=version)
        if status not in SERVABLE:
            raise VersionNotServable(
                f"{policy.model}@{version} is {status.value}: traffic reaches only a version "
                "loaded and warm on every replica",
                version=version,
                status=status.value,
            )
    if policy.canary is not None:
        _check_guard(policy.canary)


def _check_guard(guard: CanaryGuard) -> None:
    numbers = (guard.max_error_rate_delta, guard.max_p95_ratio, guard.window_s)
    if not all(math.isfinite(n) for n in numbers):
        raise InvalidTrafficPolicy("canary guard values must be finite")
    if not 0 <= guard.max_error_rate_delta <= 1:
        raise InvalidTrafficPolicy("canary maxErrorRateDelta must be between 0 and 1")
    if guard.max_p95_ratio < 1:
        raise InvalidTrafficPolicy("canary maxP95Ratio must be at least 1")
    if guard.min_requests < 1 or guard.window_s <= 0:
        raise InvalidTrafficPolicy("canary minRequests and windowS must be positive")
    steps = list(guard.ramp)
    if len(steps) > MAX_RAMP_STEPS or not all(
        math.isfinite(step) and 0 < step <= 100 for step in steps
    ):
        raise InvalidTrafficPolicy(
            f"canary ramp: at most {MAX_RAMP_STEPS} steps, each a percentage in (0, 100]"
        )
    if any(later <= earlier for earlier, later in itertools.pairwise(steps)):
        raise InvalidTrafficPolicy("canary ramp steps must go up (for example 5, 25, 50, 100)")


def statuses_for(
    policy: TrafficPolicy, rows: Mapping[str, ModelVersionRow]
) -> dict[str, VersionStatus]:
    """The statuses that change with `policy`: the arm with the most traffic LIVE, other arms
    CANARY, the shadow SHADOW; versions that had traffic and no longer do READY (loaded)."""
    wanted: dict[str, VersionStatus] = {}
    arms = {a.version for a in policy.arms}
    for version, row in rows.items():
        status = VersionStatus(row.status)
        if version == policy.live:
            new = VersionStatus.LIVE
        elif version in arms:
            new = VersionStatus.CANARY
        elif version == policy.shadow:
            new = VersionStatus.SHADOW
        elif status in (VersionStatus.LIVE, VersionStatus.CANARY, VersionStatus.SHADOW):
            new = VersionStatus.READY
        else:
            continue
        if new is not status:
            wanted[version] = new
    return wanted


def check_names(model: str, version: str) -> None:
    if not MODEL_NAME.match(model):
        raise InvalidModelSpec(
            "a model name is 1 to 100 letters, digits and . _ - : / (no @)", field="model"
        )
    if not VERSION_NAME.match(version):
        raise InvalidModelSpec(
            "a version is 1 to 64 letters, digits and . _ - + (no @)", field="version"
        )


def kind_and_task(
    model: str, known: Any, kind: ModelKind | None, task: str | None
) -> tuple[ModelKind, str]:
    if known is not None:
        if kind is not None and kind.value != known.kind:
            raise InvalidModelSpec(f"{model} is a {known.kind} model, not {kind.value}")
        if task is not None and task != known.task:
            raise InvalidModelSpec(f"{model} is a {known.task} model, not {task}")
        return ModelKind(known.kind), known.task
    if kind is None:
        raise InvalidModelSpec(f"{model} is a new model: give its kind", field="kind")
    fixed = TASK_OF_KIND.get(kind)
    if fixed is not None:
        if task not in (None, fixed):
            raise InvalidModelSpec(f"a {kind.value} model's task is {fixed}", field="task")
        return kind, fixed
    if task not in VISION_TASKS:
        raise InvalidModelSpec(
            f"a vision model's task is one of {', '.join(VISION_TASKS)}", field="task"
        )
    return kind, task  # type: ignore[return-value]
