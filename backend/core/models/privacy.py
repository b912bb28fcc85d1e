"""Per-tenant data protection policies (one row per tenant; absent means the defaults)."""

import uuid
from typing import Any

from backend.core.models.base import Timestamps, json_object, tenant_key, user_ref


class PrivacyPolicyRow(Timestamps, table=True):
    __tablename__ = "privacy_policies"

    tenant_id: uuid.UUID = tenant_key(primary_key=True)
    # What the tenant changed, merged over the operator's defaults (as guardrail policies).
    policy: dict[str, Any] = json_object()
    updated_by: uuid.UUID | None = user_ref()
