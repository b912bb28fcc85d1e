"""What a live camera session's frames cost its caller.

A frame is too small a unit for a budget round trip of its own (up to `live_max_fps` a second
per connection), so a session sums what its frames took per model version and charges the
sum to the caller's compute-seconds and money budgets every `live_charge_every_s` and when it
ends; the same sums go to the usage ledger. Once a budget is used up, the frames after it are
refused (BUDGET_EXCEEDED) before any model runs: a session overspends by at most one charging
interval of frames, as a job overspends by its hold."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from decimal import Decimal

from backend.auth.principal import Principal
from backend.errors import expected_error
from backend.limits.budgets import BudgetExceeded, Budgets, Resource
from backend.limits.usage import UsageLedger, UsagePart, merged

log = logging.getLogger(__name__)

SUBJECT = "live"


class FrameMeter:
    """One session's frames: added as they are served, charged every `every_s`."""

    def __init__(
        self,
        principal: Principal,
        budgets: Budgets | None,
        ledger: UsageLedger | None,
        *,
        every_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._principal = principal
        self._budgets = budgets
        self._ledger = ledger
        self._every_s = every_s
        self._clock = clock
        self._due: list[UsagePart] = []
        self._next = clock() + every_s
        self.exceeded: BudgetExceeded | None = None
        self._owed = {Resource.COMPUTE_SECONDS: Decimal(0), Resource.COST: Decimal(0)}

    async def admit(self) -> None:
        """Refuses a session (BUDGET_EXCEEDED) whose caller's money is already spent."""
        if self._budgets is not None:
            await self._budgets.admit(
                tenant_id=self._principal.tenant_id,
                user_id=self._principal.user_id,
                plan=self._principal.plan,
                subject=SUBJECT,
            )

    def check(self) -> None:
        """Before a frame's models run: refused once a budget is used up."""
        if self.exceeded is not None:
            raise self.exceeded

    def add(self, part: UsagePart) -> None:
        """What one model version took for one frame."""
        self._due.append(part)

    async def charge_if_due(self) -> None:
        if self._clock() >= self._next:
            await self.charge()

    async def charge(self) -> None:
        """Records and charges what the frames took since the last charge. A budget used up
        makes the next frames refused (the frames that used it were served, and are charged);
        Redis unreachable keeps the amount owed for the next charge."""
        self._next = self._clock() + self._every_s
        parts, self._due = merged(self._due), []
        principal = self._principal
        for part in parts:
            self._owed[Resource.COMPUTE_SECONDS] += part.amount
            self._owed[Resource.COST] += part.cost
            if self._ledger is not None:
                self._ledger.add(
                    tenant_id=principal.tenant_id,
                    user_id=principal.user_id,
                    resource=Resource.COMPUTE_SECONDS.value,
                    subject=SUBJECT,
                    part=part,
                )
        for resource, amount in self._owed.items():
            if amount <= 0 or self._budgets is None:
                continue
            try:
                await self._budgets.charge(
                    tenant_id=principal.tenant_id,
                    user_id=principal.user_id,
                    plan=principal.plan,
                    resource=resource,
                    amount=float(amount),
                    subject=SUBJECT,
                )
            except BudgetExceeded as exc:  # counted all the same
                self.exceeded = self.exceeded or exc
            except Exception as exc:
                if expected_error(exc) is None:
                    raise
                log.warning("live session: charging %s later: %s", resource.value, exc)
                continue
            self._owed[resource] = Decimal(0)
