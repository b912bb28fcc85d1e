"""Errors of the rails."""

from __future__ import annotations

from backend.errors import AppError


class GuardrailUnavailable(AppError):
    """A rail could not decide (it broke or timed out): the input is refused, not let through."""

    code = "GUARDRAIL_UNAVAILABLE"
    status = 503
