"""The service container: the domain services of one app instance.

`backend.app` builds it in the lifespan; the GraphQL context and the REST routers read it from
the connection's state. It lives below both so that nothing but the entry points imports
`backend.app`."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from backend.agents.runs import RunService
from backend.auth.oidc import OIDCLogin
from backend.auth.service import AuthService
from backend.conversations.service import ConversationService
from backend.core.warmup import WarmUp
from backend.guardrails.service import GuardrailService
from backend.inference.pool import InferencePool
from backend.inference.remote import RemoteInference
from backend.knowledge.service import KnowledgeService
from backend.lifecycle.operations import ModelOperations
from backend.lifecycle.reconcile import PoolReconciler
from backend.lifecycle.service import ModelRegistryService
from backend.lifecycle.watcher import RegistryWatcher
from backend.limits.budgets import Budgets
from backend.limits.ratelimit import RateLimiter
from backend.limits.usage import UsageLedger
from backend.openai_api.service import OpenAIService
from backend.privacy.service import PrivacyService
from backend.privacy.tasks import PurgeScheduler
from backend.vision.service import VisionService

__all__ = ["Services"]

log = logging.getLogger(__name__)


@dataclass
class Services:
    """The domain services of one app instance, built on its state by the lifespan."""

    auth: AuthService
    conversations: ConversationService
    limiter: RateLimiter
    budgets: Budgets
    runs: RunService
    knowledge: KnowledgeService
    oidc: OIDCLogin | None = None
    guardrails: GuardrailService | None = None  # None: rails off, or the caller's own `Guards`
    vision: VisionService | None = None  # None only in apps built without services
    # None: SIGHTLINE_VISION_ENABLED=false; remote: SIGHTLINE_VISION_BACKEND=remote
    inference: InferencePool | RemoteInference | None = None
    privacy: PrivacyService | None = None  # None only in apps built without services
    purges: PurgeScheduler | None = None
    openai: OpenAIService | None = None  # None only in apps built without services
    grace_s: float = 10.0
    warm_up: WarmUp | None = None  # None: SIGHTLINE_SERVER_WARM_UP=false
    lifecycle: ModelOperations | None = None  # None only in apps built without services
    registry: ModelRegistryService | None = None  # None only in apps built without services
    models_watcher: RegistryWatcher | None = None  # this replica's view of the registry
    reconciler: PoolReconciler | None = None  # loads the registry's vision versions (vision on)
    ledger: UsageLedger | None = None  # usage records of searches and /v1/embeddings

    async def aclose(self) -> None:
        """Stops every service; each step is timed in the log (a slow shutdown says where)."""
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        if (warm_up := self.warm_up) is not None:
            steps.append(("warm-up", warm_up.close))
        if (models_watcher := self.models_watcher) is not None:
            steps.append(("model registry", models_watcher.close))
        if (reconciler := self.reconciler) is not None:  # no version loads while the pool stops
            steps.append(("model versions", reconciler.close))
        if (purges := self.purges) is not None:
            steps.append(("purges", purges.close))
        if (privacy := self.privacy) is not None:
            steps.append(("erasures", lambda: privacy.close(self.grace_s)))
        steps += [
            ("auth", self.auth.close),
            ("runs", lambda: self.runs.close(self.grace_s)),
            ("models", self.runs.models.aclose),
            ("knowledge", lambda: self.knowledge.close(self.grace_s)),
        ]
        if (guardrails := self.guardrails) is not None:
            steps.append(("guardrails", lambda: guardrails.close(self.grace_s)))
        if (vision := self.vision) is not None:
            steps.append(("vision", lambda: vision.close(self.grace_s)))
            steps.append(("vision events", vision.events.close))
        if (inference := self.inference) is not None:
            steps.append(("inference", lambda: inference.close(self.grace_s)))
        if (lifecycle := self.lifecycle) is not None:  # after serving: its last figures count
            steps.append(("model figures", lifecycle.close))
        if (ledger := self.ledger) is not None:  # after serving: its last records count
            steps.append(("usage records", ledger.close))
        for name, step in steps:
            started = time.perf_counter()
            await step()
            took = time.perf_counter() - started
            (log.warning if took > 2 else log.debug)("shutdown: %s took %.2f s", name, took)
