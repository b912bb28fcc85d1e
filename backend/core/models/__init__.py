"""Tables. Every table lives here (one module per area) so Alembic sees one metadata."""

from backend.core.models.base import Base
from backend.core.models.chat import Conversation, Message, MessageRole, Run, RunStatus
from backend.core.models.guardrails import GuardrailPolicyRow
from backend.core.models.identity import (
    ApiKey,
    AuditEvent,
    OAuthClient,
    RefreshToken,
    SigningKey,
    UsageRecord,
)
from backend.core.models.knowledge import (
    Chunk,
    Document,
    IngestionJob,
    IngestionUpload,
    JobStatus,
    KnowledgeEmbedding,
    LexemeStat,
)
from backend.core.models.lifecycle import (
    DriftSnapshot,
    ModelPin,
    ModelVersionRow,
    RegistryModel,
    RegistryRevision,
    TrafficPolicyRevision,
    TrafficPolicyRow,
)
from backend.core.models.privacy import PrivacyPolicyRow
from backend.core.models.tenancy import Tenant, User, UserKind, UserRole
from backend.core.models.vision import VisionJob, VisionStatus, VisionUpload

# Tables whose rows belong to one tenant: row-level security limits them to `app.tenant_id`.
TENANT_TABLES = (
    "users",
    "refresh_tokens",
    "api_keys",
    "oauth_clients",
    "audit_events",
    "usage_records",
    "conversations",
    "messages",
    "runs",
    "documents",
    "chunks",
    "ingestion_jobs",
    "ingestion_uploads",
    "lexeme_stats",
    "guardrail_policies",
    "vision_jobs",
    "vision_uploads",
    "privacy_policies",
    "model_pins",
)

__all__ = [
    "TENANT_TABLES",
    "ApiKey",
    "AuditEvent",
    "Base",
    "Chunk",
    "Conversation",
    "Document",
    "DriftSnapshot",
    "GuardrailPolicyRow",
    "IngestionJob",
    "IngestionUpload",
    "JobStatus",
    "KnowledgeEmbedding",
    "LexemeStat",
    "Message",
    "MessageRole",
    "ModelPin",
    "ModelVersionRow",
    "OAuthClient",
    "PrivacyPolicyRow",
    "RefreshToken",
    "RegistryModel",
    "RegistryRevision",
    "Run",
    "RunStatus",
    "SigningKey",
    "Tenant",
    "TrafficPolicyRevision",
    "TrafficPolicyRow",
    "UsageRecord",
    "User",
    "UserKind",
    "UserRole",
    "VisionJob",
    "VisionStatus",
    "VisionUpload",
]
