"""Prices of compute: money per compute-second of a vision or embedding model version, by the
kind of device it ran on (a version's own prices, else the settings'). Chat aliases price
tokens instead (backend.agents.models)."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Protocol

from backend.limits.usage import UsagePart

REMOTE = "remote"  # an endpoint or inference server: the device is not ours to see


def device_kind(device: str) -> str:
    """`cuda:1` -> `cuda`, `cpu` -> `cpu`: the kind a price is set for."""
    return device.split(":", 1)[0].strip().lower() or "cpu"


def compute_price(
    own: Mapping[str, float] | None, defaults: Mapping[str, float], device: str
) -> Decimal:
    """Money per compute-second on `device`: the version's price for its kind, else the
    default for it, else 0 (a kind nobody priced is free, not an error)."""
    kind = device_kind(device)
    for prices in (own or {}, defaults):
        if kind in prices:
            return Decimal(str(prices[kind]))
    return Decimal(0)


def compute_cost(seconds: float, price: Decimal) -> Decimal:
    """What `seconds` cost at `price`, to the precision usage records keep (6 places)."""
    return (Decimal(str(round(seconds, 6))) * price).quantize(Decimal("0.000001"))


class SpendMetrics(Protocol):
    def model_spent(  # noqa: PLR0917 (backend.core.metrics.Metrics.model_spent)
        self,
        tenant: object,
        model: str,
        version: str,
        kind: str,
        cost: float,
        compute_s: float = 0.0,
        device: str = "",
    ) -> None: ...


class ComputePricing:
    """Prices compute-seconds (the settings' defaults unless a version names its own) and
    counts what they cost in the metrics."""

    def __init__(self, defaults: Mapping[str, float], metrics: SpendMetrics | None = None) -> None:
        self._defaults = dict(defaults)
        self._metrics = metrics

    def spent(  # noqa: PLR0917
        self,
        tenant: object,
        model: str,
        version: str,
        kind: str,
        seconds: float,
        device: str,
        own: Mapping[str, float] | None = None,
    ) -> Decimal:
        """What `seconds` of `model@version` on `device` cost `tenant`; counted in the metrics."""
        cost = compute_cost(seconds, compute_price(own, self._defaults, device))
        if self._metrics is not None:
            self._metrics.model_spent(
                tenant, model, version, kind, float(cost), seconds, device_kind(device)
            )
        return cost

    def embedding(  # noqa: PLR0917
        self,
        tenant: object,
        model: str,
        version: str,
        seconds: float,
        device: str,
        own: Mapping[str, float] | None = None,
    ) -> UsagePart:
        """An embedding call's usage: its compute-seconds and what they cost `tenant`."""
        cost = self.spent(tenant, model, version, "embedding", seconds, device, own)
        return UsagePart(model, version, "embedding", compute_cost(seconds, Decimal(1)), cost)


def device_of(setting: str) -> str:
    """The device kind a pool set to `setting` runs on. `auto` is resolved as the workers do
    (the first GPU when there is one) without importing torch into the API process for it: a
    GPU is there when the NVIDIA driver's control device is."""
    if setting != "auto":
        return device_kind(setting)
    return "cuda" if Path("/dev/nvidiactl").exists() else "cpu"
