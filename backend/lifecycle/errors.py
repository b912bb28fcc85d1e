"""Errors of the model registry: each a stable code; the policy in force is unchanged by any."""

from __future__ import annotations

from backend.errors import Conflict, NotFound, ValidationFailed


class ModelNotFound(NotFound):
    code = "MODEL_NOT_FOUND"


class VersionNotFound(NotFound):
    code = "MODEL_VERSION_NOT_FOUND"


class VersionExists(Conflict):
    """A model's versions are immutable: a changed manifest is a new version."""

    code = "MODEL_VERSION_EXISTS"


class InvalidModelSpec(ValidationFailed):
    """A manifest or endpoint spec that cannot be served, or a kind or task that does not fit."""

    code = "INVALID_MODEL_SPEC"


class ChecksumMismatch(ValidationFailed):
    """A file of the manifest does not match its sha256 (or the version's)."""

    code = "CHECKSUM_MISMATCH"


class InvalidTrafficPolicy(ValidationFailed):
    """Weights that do not sum to 100, a shadow that is also an arm, a rate outside 0..1..."""

    code = "INVALID_TRAFFIC_POLICY"


class VersionNotServable(Conflict):
    """The version is not ready for traffic: still loading, failed, or retired."""

    code = "MODEL_VERSION_NOT_SERVABLE"


class VersionInUse(Conflict):
    """The version carries traffic, is the shadow, or a tenant pins it."""

    code = "MODEL_VERSION_IN_USE"


class NothingToRollBack(Conflict):
    code = "NOTHING_TO_ROLL_BACK"


class StalePolicy(Conflict):
    """The policy changed since the revision the caller read."""

    code = "STALE_TRAFFIC_POLICY"
