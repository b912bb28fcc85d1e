"""Sightline: real-time AI backend (GraphQL streaming chat and vision on one control plane)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sightline")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"
