"""GraphQL IDs of UUID-keyed rows: a malformed one is BAD_USER_INPUT, not a server error."""

from __future__ import annotations

import uuid

import strawberry

from backend.errors import ValidationFailed


def parse_id(value: strawberry.ID, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise ValidationFailed(f"{field} is not a valid id", field=field) from None
