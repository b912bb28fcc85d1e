"""What each rail does for a tenant: on or off, its threshold and its action. A tenant's stored
policy is a partial document merged over the operator's defaults, so new rails reach every
tenant with their defaults and a tenant only records what it changed."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from backend.agents.guards import GuardAction
from backend.guardrails.content import CATEGORIES
from backend.guardrails.pii import PiiKind


class _Rail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True


class InjectionRail(_Rail):
    """Jailbreaks and prompt injection in what the user sends."""

    threshold: float = Field(0.5, ge=0.0, le=1.0)
    action: GuardAction = GuardAction.BLOCK
    history_turns: int = Field(3, ge=0, le=20, description="earlier user turns read with this one")
    classifier_threshold: float = Field(
        0.99,
        ge=0.0,
        le=1.0,
        description="the ensemble's score (signatures, TF-IDF and the transformer classifier, "
        "calibrated on bench/data) at which a message the cheap rails let through is an attack",
    )
    learned: bool = Field(
        False,
        description="also score each message with the learned attack head on its MiniLM vector "
        "(one embedding per message; off by default: see the README's held-out figures)",
    )
    learned_threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="the learned head's probability at which a message is an attack; unset: "
        "the serving head version's own (0.93 for the packaged head), so a refitted version "
        "comes with the threshold calibrated for it",
    )


class PiiRail(_Rail):
    kinds: list[PiiKind] = Field(default_factory=lambda: list(PiiKind))
    input_action: GuardAction = GuardAction.REDACT
    output_action: GuardAction = GuardAction.REDACT


class ProfanityRail(_Rail):
    input_action: GuardAction = GuardAction.WARN
    output_action: GuardAction = GuardAction.REDACT


class ToxicityRail(_Rail):
    """Abuse the word list does not list (insults, harassment, threats, demeaning
    generalisations), scored sentence by sentence by the packaged classifier; on the answer with
    `output.toxicity`. Off by default (see the README's figures)."""

    enabled: bool = False
    threshold: float = Field(
        0.75,
        ge=0.0,
        le=1.0,
        description="the most offensive sentence's probability at which a text is abusive "
        "(0.75 flags at most 1% of the ordinary text bench/toxicity.py chose it on)",
    )
    action: GuardAction = Field(
        GuardAction.WARN, description="on a message (the answer's chunks are blocked)"
    )


class TopicRail(_Rail):
    """Allowed and denied topics, matched by embedding similarity (off until topics are set)."""

    enabled: bool = False
    allowed: list[str] = Field(default_factory=list, max_length=50)
    denied: list[str] = Field(default_factory=list, max_length=50)
    threshold: float = Field(0.45, ge=0.0, le=1.0)
    action: GuardAction = GuardAction.BLOCK


class ContentRail(_Rail):
    """Plainly harmful requests (malware, weapons, fraud...), however they are wrapped: the
    message's sentences compared by embedding similarity with example requests of each
    category, and with look-alike harmless requests (a question about defending against
    malware is not a request for it). Off unless a tenant turns it on: on held-out prompts it
    caught 46.4% of harmful requests at 6.9% false positives (README), short of the issue's goal."""

    enabled: bool = False
    categories: list[str] = Field(
        default_factory=lambda: list(CATEGORIES),
        description="built-in categories that apply: " + ", ".join(CATEGORIES),
    )
    custom: dict[str, list[str]] = Field(
        default_factory=dict,
        max_length=20,
        description="the tenant's own categories: name -> example requests (at most 20 each)",
    )
    threshold: float = Field(0.62, ge=0.0, le=1.0)
    margin: float = Field(
        0.04, ge=0.0, le=1.0, description="how much nearer a harmful example than a harmless one"
    )
    action: GuardAction = GuardAction.BLOCK

    @field_validator("categories")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(CATEGORIES))
        if unknown:
            raise ValueError(f"unknown categories: {', '.join(unknown)}")
        return value

    @field_validator("custom")
    @classmethod
    def _examples(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, examples in value.items():
            if not 1 <= len(examples) <= 20 or any(not 0 < len(e) <= 500 for e in examples):
                raise ValueError(f"category {name!r}: 1 to 20 examples of 1 to 500 characters")
        return value


class SelfCheckRail(_Rail):
    """The chat model judges each message (one more, short, model call); off by default."""

    enabled: bool = False
    model: str | None = Field(None, description="model alias; None: the default model")
    action: GuardAction = GuardAction.BLOCK


class LengthRail(_Rail):
    max_chars: int = Field(16_000, ge=1)


class RetrievalRail(_Rail):
    """Instructions hidden in retrieved chunks: REDACT neutralises the chunk, BLOCK drops it."""

    threshold: float = Field(0.5, ge=0.0, le=1.0)
    action: GuardAction = GuardAction.REDACT


class OutputRail(_Rail):
    """Checks the answer as it streams; `injection` also stops an answer that starts to recite
    jailbreak text (a model that fell for an attack the input rail missed). With `content` or
    `self_check`, the answer is held back and released in chunks, each once those model rails
    passed it (they see the chunk, the self-check also the end of the one before; `toxicity`
    holds it back likewise, for the toxicity classifier); a chunk they
    block is never sent: the answer ends there with the safe reply."""

    injection: bool = True
    content: bool = Field(
        False, description="the content rail's categories and threshold on each chunk"
    )
    toxicity: bool = Field(
        False, description="the toxicity classifier and its threshold on each chunk"
    )
    self_check: bool = Field(
        False, description="the chat model judges each chunk (one short model call a chunk)"
    )
    chunk_chars: int = Field(
        400, ge=50, le=8000, description="about this much text a chunk (ending a sentence)"
    )
    context_chars: int = Field(
        200, ge=0, le=4000, description="of the chunk before, given to the self-check"
    )


class ImageRail(_Rail):
    threshold: float = Field(0.8, ge=0.0, le=1.0)
    action: GuardAction = GuardAction.BLOCK


class GuardrailPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    injection: InjectionRail = Field(default_factory=InjectionRail)
    pii: PiiRail = Field(default_factory=PiiRail)
    profanity: ProfanityRail = Field(default_factory=ProfanityRail)
    toxicity: ToxicityRail = Field(default_factory=ToxicityRail)
    topics: TopicRail = Field(default_factory=TopicRail)
    content: ContentRail = Field(default_factory=ContentRail)
    length: LengthRail = Field(default_factory=LengthRail)
    self_check: SelfCheckRail = Field(default_factory=SelfCheckRail)
    retrieval: RetrievalRail = Field(default_factory=RetrievalRail)
    output: OutputRail = Field(default_factory=OutputRail)
    image: ImageRail = Field(default_factory=ImageRail)
    safe_reply: str = Field("I can't help with that request.", min_length=1, max_length=500)


def merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """`change` over `base`, recursively for nested objects (lists are replaced whole)."""
    out = dict(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def effective(defaults: dict[str, Any], stored: dict[str, Any] | None) -> GuardrailPolicy:
    """The policy a tenant runs under. Raises pydantic's ValidationError on a bad document."""
    return GuardrailPolicy.model_validate(merge(defaults, stored or {}))
