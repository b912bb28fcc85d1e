"""The learned head's versions this replica scores with: every version of the registry's
`attack-head` model that is kept loaded (built from its spec: the weights travel in the
registry, so every replica has every version), else the packaged head.

The lifecycle router (backend.lifecycle.router.ModelRouter) asks `is_ready` and
`local_versions`; the registry watcher hands each snapshot to `apply` first, then to the router.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from backend.guardrails.head import MODEL, AttackHead
from backend.lifecycle.policy import LOADED, ModelKind, RegistrySnapshot, VersionStatus

log = logging.getLogger(__name__)

# a live version is the default; then the others that may take traffic, in this order
_PREFERENCE = (VersionStatus.LIVE, VersionStatus.CANARY, VersionStatus.SHADOW, VersionStatus.READY)


class HeadVersions:
    """The versions of the learned head built here, by name."""

    def __init__(
        self,
        packaged: AttackHead,
        model: str = MODEL,
        servable: Callable[[AttackHead], bool] | None = None,
    ) -> None:
        self.model = model
        self.packaged = packaged
        # whether a head can score here (it reads this replica's embedder's vectors): one that
        # cannot is not built, so the router never sends a message to it
        self._servable = servable
        self._heads: dict[str, AttackHead] = {packaged.packaged_version: packaged}
        self._revision = -1

    async def __call__(self, snapshot: RegistrySnapshot) -> None:
        """The registry watcher's listener."""
        self.apply(snapshot)

    def apply(self, snapshot: RegistrySnapshot) -> None:
        """Builds the versions of `snapshot` that are kept loaded, best first (live, canary,
        shadow, ready). A spec that is not a head is skipped (logged): the registry checks
        specs when they are registered, so that is a version of another code's format; so is a
        head for another embedding model's vectors. With no version at all (no registry record
        yet, or every one retired or skipped), the packaged head."""
        if snapshot.revision < self._revision:
            return
        self._revision = snapshot.revision
        records = [
            r
            for r in snapshot.versions.get(self.model, ())
            if r.kind is ModelKind.GUARDRAIL and r.status in LOADED
        ]
        records.sort(key=lambda r: _PREFERENCE.index(r.status) if r.status in _PREFERENCE else 9)
        heads: dict[str, AttackHead] = {}
        for record in records:
            known = self._heads.get(record.version)
            if known is not None:  # a version's spec never changes: built once
                heads[record.version] = known
                continue
            try:
                built = AttackHead.from_spec(record.spec)
            except ValueError as exc:
                log.warning("%s@%s is not usable here: %s", self.model, record.version, exc)
                continue
            if self._servable is not None and not self._servable(built):
                log.warning(
                    "%s@%s reads %s vectors, not this replica's embedder's: not served here",
                    self.model,
                    record.version,
                    built.embedding_model,
                )
                continue
            heads[record.version] = built
        self._heads = heads or {self.packaged.packaged_version: self.packaged}

    def get(self, version: str) -> AttackHead | None:
        return self._heads.get(version)

    @property
    def default(self) -> tuple[str, AttackHead]:
        """The version that serves without a router (its best: live first)."""
        return next(iter(self._heads.items()))

    def is_ready(self, model: str, version: str) -> bool:
        """Whether this replica scores with `model@version` now (the router asks)."""
        return model == self.model and version in self._heads

    def local_versions(self, model: str) -> list[str]:
        """The versions built here, the default first (the router's fallback)."""
        return list(self._heads) if model == self.model else []
