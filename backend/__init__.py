"""Sightline: real-time AI backend (GraphQL streaming chat and vision on one control plane)."""

import os
from importlib.metadata import PackageNotFoundError, version

# ONNX Runtime (1.30) starts a telemetry client when it is imported: it writes a device id
# under ~/.cache/Microsoft and sends events to mobile.events.data.microsoft.com (a DNS lookup
# every 15 s was seen from an idle server). A self-hosted service sends nothing out; set before
# any part of Sightline can import it, and inherited by every worker process. An operator who
# wants it sets ORT_DISABLE_TELEMETRY=0.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

try:
    __version__ = version("sightline")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"
