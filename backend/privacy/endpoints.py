"""The download of a requested data export (a JSON archive, streamed)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from backend.auth.service import AuthService
from backend.errors import Unauthenticated
from backend.privacy.service import PrivacyService

EXPORTS_PATH = "/privacy/exports"


def privacy_router(
    privacy_of: Callable[[Request], PrivacyService],
    auth_of: Callable[[Request], AuthService],
) -> APIRouter:
    router = APIRouter(tags=["privacy"])

    @router.get(EXPORTS_PATH + "/{export_id}")
    async def download_export(export_id: str, request: Request) -> StreamingResponse:
        """The archive of an export requested with `exportUserData`: once, by its requester
        (same credential kind: `Authorization: Bearer ...`), before it expires."""
        credential = request.headers.get("authorization") or request.headers.get("x-api-key")
        if not credential:
            raise Unauthenticated("authentication required")
        principal = await auth_of(request).authenticate(credential)  # InvalidToken: 401
        archive = await privacy_of(request).open_export(principal, export_id)
        return StreamingResponse(
            archive,
            media_type="application/json",
            headers={
                "content-disposition": 'attachment; filename="sightline-export.json"',
                "cache-control": "no-store",
            },
        )

    return router
