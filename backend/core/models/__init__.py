"""Tables. Every table lives here (one module per area) so Alembic sees one metadata."""

from backend.core.models.base import Base
from backend.core.models.tenancy import Tenant, User, UserRole

__all__ = ["Base", "Tenant", "User", "UserRole"]
