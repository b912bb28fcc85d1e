"""What a server serves from its settings and packages, as registry entries to seed at start:
the inference pool's vision manifests, the chat aliases, the knowledge base's embedder, the
guardrails' learned heads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from backend.config import ModelSpec
from backend.inference.manifest import ModelManifest
from backend.lifecycle.policy import ModelKind, split_pin
from backend.lifecycle.schemas import ATTACK_HEAD_MODEL, EmbeddingSpec
from backend.lifecycle.service import SeedEntry


class PackagedHead(Protocol):
    """A guardrail model the server ships (backend.guardrails.head.AttackHead)."""

    @property
    def packaged_version(self) -> str: ...

    @property
    def digest(self) -> str: ...

    def spec(self) -> dict[str, Any]: ...


FIRST_VERSION = "1"  # of a chat alias or an endpoint's embedding model, until one is registered


def served_models(
    manifests: Sequence[ModelManifest],
    chat: Mapping[str, ModelSpec],
    embedder: tuple[str, int, str | None] | None = None,
    heads: Sequence[PackagedHead] = (),
) -> list[SeedEntry]:
    """Seed entries for `manifests` (the pool's), `chat` (alias -> spec), `embedder`
    (its name, dimensions and endpoint; no endpoint: the packaged model, named `name@version`)
    and the guardrails' packaged `heads` (model `attack-head`, each version named after its
    weights' digest: a release with a refitted head seeds a new version, READY, that serves
    once promoted)."""
    entries = [
        SeedEntry(
            model=m.name,
            kind=ModelKind.VISION,
            task=m.task.value,
            version=m.version,
            spec=m.to_dict(),
            sha256=m.sha256,
        )
        for m in manifests
    ]
    entries += [
        SeedEntry(
            model=alias,
            kind=ModelKind.CHAT,
            task="chat",
            version=FIRST_VERSION,
            spec=spec.model_dump(mode="json"),
        )
        for alias, spec in sorted(chat.items())
    ]
    if embedder is not None:
        name, dimensions, base_url = embedder
        model, version = split_pin(name)
        spec = EmbeddingSpec(
            provider="openai" if base_url else "local",
            base_url=base_url,
            model=name if base_url else None,
            dimensions=dimensions,
        )
        entries.append(
            SeedEntry(
                model=model,
                kind=ModelKind.EMBEDDING,
                task="embedding",
                version=version or FIRST_VERSION,
                spec=spec.model_dump(mode="json"),
            )
        )
    entries += [
        SeedEntry(
            model=ATTACK_HEAD_MODEL,
            kind=ModelKind.GUARDRAIL,
            task="injection",
            version=head.packaged_version,
            spec=head.spec(),
            sha256=head.digest,
        )
        for head in heads
    ]
    return entries
