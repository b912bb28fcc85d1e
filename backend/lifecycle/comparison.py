"""`modelComparison`: a model's live version and its candidates side by side over a window,
with the shadow's agreement with live."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from backend.errors import NotFound, ValidationFailed
from backend.lifecycle.policy import TrafficPolicy
from backend.lifecycle.shadow import ShadowAgreement, ShadowLedger
from backend.lifecycle.stats import ServingStats, VersionWindow


class PolicyProvider(Protocol):
    """The traffic policy in force for a model (None: no such model, or no policy)."""

    def policy(self, model: str) -> TrafficPolicy | None: ...


class Role(StrEnum):
    LIVE = "live"
    CANDIDATE = "candidate"  # an arm with traffic beside live (a canary, or the B of an A/B)
    SHADOW = "shadow"


@dataclass(frozen=True, slots=True)
class VersionFigures:
    role: Role
    weight: float  # percent of traffic (a shadow: 0)
    window: VersionWindow
    agreement: ShadowAgreement | None = None  # the shadow's comparison with live


@dataclass(frozen=True, slots=True)
class ModelComparison:
    model: str
    window_s: float
    shadow_rate: float
    versions: tuple[VersionFigures, ...]  # live first


class ModelComparisons:
    """Reads the figures of a model's versions; the versions come from its policy."""

    def __init__(
        self,
        stats: ServingStats,
        agreements: ShadowLedger,
        policies: PolicyProvider,
        *,
        max_window_s: float,
    ) -> None:
        self._stats = stats
        self._agreements = agreements
        self._policies = policies
        self._max_window_s = max_window_s

    async def compare(self, model: str, window_s: float) -> ModelComparison:
        """Live, then each other arm, then the shadow. NOT_FOUND without a policy;
        BAD_USER_INPUT for a window outside (0, the stats' retention]."""
        if not 0 < window_s <= self._max_window_s:
            raise ValidationFailed(
                f"window must be more than 0 and at most {self._max_window_s:g} seconds",
                window=window_s,
            )
        policy = self._policies.policy(model)
        if policy is None:
            raise NotFound("no such model", model=model)
        live = policy.live
        weights = {arm.version: arm.weight for arm in policy.arms}
        roles = [(live, Role.LIVE, weights[live])]
        roles += [
            (arm.version, Role.CANDIDATE, arm.weight) for arm in policy.arms if arm.version != live
        ]
        if policy.shadow is not None:
            roles.append((policy.shadow, Role.SHADOW, 0.0))
        windows = await asyncio.gather(
            *(self._stats.window(model, version, window_s) for version, _, _ in roles)
        )
        agreement = (
            await self._agreements.window(model, live, policy.shadow, window_s)
            if policy.shadow is not None
            else None
        )
        return ModelComparison(
            model=model,
            window_s=min(window_s, self._max_window_s),
            shadow_rate=policy.shadow_rate,
            versions=tuple(
                VersionFigures(
                    role=role,
                    weight=weight,
                    window=window,
                    agreement=agreement if role is Role.SHADOW else None,
                )
                for (_, role, weight), window in zip(roles, windows, strict=True)
            ),
        )
