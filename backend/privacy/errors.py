"""Errors of data protection requests."""

from __future__ import annotations

from backend.errors import AppError, Conflict, Forbidden


class ErasureRefused(Conflict):
    """The erasure would leave the tenant without an owner, or erase the operators' tenant."""

    code = "ERASURE_REFUSED"


class NotOperator(Forbidden):
    """Only platform operators erase tenants."""

    code = "FORBIDDEN"


class ExportGone(AppError):
    """The export was never requested, has been downloaded, or its time ran out."""

    code = "EXPORT_GONE"
    status = 410
