"""What the registry service takes and gives: endpoint specs, a model with its versions, policy
and pins, and the policy as stored (JSON) and as routed (`backend.lifecycle.policy`)."""

from __future__ import annotations

import re
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

from backend.config import ComputePrices
from backend.lifecycle.policy import Arm, CanaryGuard, ModelKind, StickyKey, TrafficPolicy

# Names clients write (`name@version`): no `@`, no spaces; `/` and `:` for endpoint model names.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,99}$")
VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_NOTES_CHARS = 2000  # the column's length
MAX_REASON_CHARS = 500

TASK_OF_KIND = {
    ModelKind.CHAT: "chat",
    ModelKind.EMBEDDING: "embedding",
    ModelKind.GUARDRAIL: "injection",
}
VISION_TASKS = ("classification", "detection", "ocr")


class EmbeddingSpec(BaseModel):
    """An embedding model: the packaged one (`local`) or an OpenAI-compatible endpoint."""

    model_config = ConfigDict(extra="forbid")

    provider: str = Field("openai", pattern="^(openai|local)$")
    base_url: str | None = None
    model: str | None = None  # the name the endpoint knows; default: the registry model's
    api_key_env: str | None = None  # the variable holding its key (never the key)
    dimensions: int = Field(384, ge=1, le=16_384)
    # money per compute-second by device kind (cpu, cuda, remote); unset kinds: the settings'
    compute_second_prices: ComputePrices = Field(default_factory=dict)


# the guardrails' learned head as a registry model (backend.guardrails.head)
ATTACK_HEAD_MODEL = "attack-head"


class AttackHeadSpec(BaseModel):
    """A version of the injection rail's learned head (backend.guardrails.head): logistic
    regression over an embedding model's vectors. The weights are the spec, so every replica
    builds every version from the registry alone."""

    model_config = ConfigDict(extra="forbid")

    embedding_model: str = Field(pattern=MODEL_NAME.pattern)  # the vectors it reads (no version)
    weights: list[FiniteFloat] = Field(min_length=1, max_length=16_384)
    bias: FiniteFloat
    # the probability at which it flags a message (a tenant's `injection.learned_threshold`
    # overrides it); a refit head comes with its own, calibrated on ordinary messages
    threshold: float = Field(gt=0.0, le=1.0)
    provenance: dict[str, str | int | float] = Field(default_factory=dict)  # how it was fitted


@dataclass(frozen=True)
class VersionDetails:
    """One version as the API shows it."""

    model: str
    version: str
    status: str
    spec: dict[str, Any]
    sha256: str | None
    error: str | None
    notes: str
    registered_by: uuid.UUID | None
    registered_at: datetime | None


@dataclass(frozen=True)
class PinDetails:
    tenant_id: uuid.UUID
    model: str
    version: str


@dataclass(frozen=True)
class ModelDetails:
    name: str
    kind: ModelKind
    task: str
    versions: list[VersionDetails] = field(default_factory=list)
    policy: TrafficPolicy | None = None
    pins: list[PinDetails] = field(default_factory=list)  # those the caller may see


def arms_json(arms: tuple[Arm, ...]) -> list[dict[str, Any]]:
    return [{"version": a.version, "weight": a.weight} for a in arms]


def arms_of(raw: list[dict[str, Any]]) -> tuple[Arm, ...]:
    return tuple(Arm(str(a["version"]), float(a["weight"])) for a in raw)


def canary_json(guard: CanaryGuard | None) -> dict[str, Any] | None:
    return asdict(guard) if guard is not None else None


def canary_of(raw: dict[str, Any] | None) -> CanaryGuard | None:
    if not raw:
        return None
    return CanaryGuard(**{**raw, "ramp": tuple(float(step) for step in raw.get("ramp") or ())})


def policy_of(  # noqa: PLR0917 (a stored row's columns)
    model: str,
    arms: list[dict[str, Any]],
    sticky: str,
    shadow: str | None,
    shadow_rate: float,
    canary: dict[str, Any] | None,
    revision: int,
) -> TrafficPolicy:
    return TrafficPolicy(
        model=model,
        arms=arms_of(arms),
        sticky=StickyKey(sticky),
        shadow=shadow,
        shadow_rate=shadow_rate,
        canary=canary_of(canary),
        revision=revision,
    )
