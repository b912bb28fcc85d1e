"""The rails the settings ask for: the local checks (`GuardrailService`), or the same checks run
by NeMo Guardrails' flows (`NemoGuardrailService`). Kept apart from both so that neither engine
imports the other."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from backend.config import ClassifierMode, GuardrailEngine, GuardrailSettings
from backend.core.db import Database
from backend.guardrails import classifier
from backend.guardrails.images import OpenNsfwClassifier
from backend.guardrails.selfcheck import Judge
from backend.guardrails.service import GuardrailMetrics, GuardrailService
from backend.guardrails.topics import TextEmbedder, TopicMatcher


def build_guardrails(
    db: Database,
    settings: GuardrailSettings,
    *,
    embedder: TextEmbedder | None = None,
    judges: Callable[[str | None], Judge] | None = None,
    metrics: GuardrailMetrics | None = None,
) -> GuardrailService:
    """The rails the settings ask for: local checks, or the same checks run by NeMo's flows."""
    options: dict[str, Any] = {
        "defaults": settings.policy,
        "topics": TopicMatcher(embedder) if embedder is not None else None,
        "images": OpenNsfwClassifier(threads=settings.image_threads),
        "judges": judges,
        "metrics": metrics,
        "policy_cache_s": settings.policy_cache_s,
        "check_timeout_s": settings.check_timeout_s,
        "inline_max_chars": settings.inline_max_chars,
        "output_hold_chars": settings.output_hold_chars,
    }
    mode = settings.classifier
    if mode is not ClassifierMode.OFF:
        options |= {
            "classifier": classifier.TransformerClassifier(
                threads=settings.classifier_threads,
                timeout_s=settings.classifier_timeout_s,
                max_chars=settings.classifier_chars,
            ),
            "classifier_mode": mode,
            "classifier_uncertain_score": settings.classifier_uncertain_score,
            "classifier_uncertain_chars": settings.classifier_uncertain_chars,
            "classifier_fail_open": settings.classifier_fail_open,
        }
    if settings.engine is GuardrailEngine.NEMO:
        from backend.guardrails.nemo import NemoGuardrailService

        return NemoGuardrailService(db, embedder=embedder, **options)
    return GuardrailService(db, **options)
