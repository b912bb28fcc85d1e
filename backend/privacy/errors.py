"""Errors of data protection requests."""

from __future__ import annotations

from backend.auth.errors import NotOperator
from backend.errors import AppError, Conflict

__all__ = ["ErasureRefused", "ExportGone", "NotOperator"]


class ErasureRefused(Conflict):
    """The erasure would leave the tenant without an owner, or erase the operators' tenant."""

    code = "ERASURE_REFUSED"


class ExportGone(AppError):
    """The export was never requested, has been downloaded, or its time ran out."""

    code = "EXPORT_GONE"
    status = 410
