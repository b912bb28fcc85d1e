"""Root query fields."""

from __future__ import annotations

import strawberry

from backend.graphql.auth import AuthMutation, AuthQuery
from backend.graphql.chat import ChatMutation, ChatQuery
from backend.graphql.drift import DriftMutation, DriftQuery
from backend.graphql.guardrails import GuardrailMutation, GuardrailQuery
from backend.graphql.knowledge import KnowledgeMutation, KnowledgeQuery
from backend.graphql.model_comparison import ModelComparisonQuery
from backend.graphql.operations_timeline import OperationsTimelineQuery
from backend.graphql.privacy import PrivacyMutation, PrivacyQuery
from backend.graphql.registry import RegistryMutation, RegistryQuery
from backend.graphql.runs import RunMutation, RunQuery
from backend.graphql.types import ServerInfo
from backend.graphql.vision import VisionMutation, VisionQuery


@strawberry.type
class PlatformQuery:
    @strawberry.field(description="Version, enabled features and packaged models of this server.")
    def server_info(self) -> ServerInfo:
        return ServerInfo()


@strawberry.type
class Query(
    PlatformQuery,
    AuthQuery,
    ChatQuery,
    RunQuery,
    KnowledgeQuery,
    GuardrailQuery,
    VisionQuery,
    PrivacyQuery,
    ModelComparisonQuery,
    OperationsTimelineQuery,
    RegistryQuery,
    DriftQuery,
):
    pass


@strawberry.type
class Mutation(
    AuthMutation,
    ChatMutation,
    RunMutation,
    KnowledgeMutation,
    GuardrailMutation,
    VisionMutation,
    PrivacyMutation,
    RegistryMutation,
    DriftMutation,
):
    pass
