"""Loading and serving the packaged models prints log lines only: the loaders' own output
(EfficientNet's "Loaded pretrained weights for ...", transformers' progress bars) went around
the log, between its JSON lines, once per worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.conftest import scaled

LOAD_THE_PACKAGED_MODELS = textwrap.dedent(
    """
    import asyncio

    from backend.config import TelemetrySettings
    from backend.core.telemetry import configure_logging
    from backend.inference.llm.local import LocalLlamaProvider
    from backend.inference.manifest import load_manifests
    from backend.inference.pool import InferencePool
    from backend.knowledge.embeddings import LocalEmbedder

    async def main() -> None:
        configure_logging(TelemetrySettings())  # as `sightline serve` does: JSON lines
        pool = InferencePool(load_manifests(None), workers=1, threads=1)
        await pool.start()
        embedder = LocalEmbedder(threads=1)
        llm = LocalLlamaProvider(n_ctx=512, threads=1)
        try:
            await pool.wait_ready(300)
            await embedder.load()
            await llm.load()
        finally:
            await llm.aclose()
            await embedder.aclose()
            await pool.close()

    asyncio.run(main())
    """
)


def test_loading_the_packaged_models_prints_only_json_log_lines() -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SIGHTLINE_")}
    finished = subprocess.run(
        [sys.executable, "-c", LOAD_THE_PACKAGED_MODELS],
        env=environment,
        capture_output=True,
        text=True,
        timeout=scaled(400),
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout == ""
    records = []
    for line in finished.stderr.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a log line: {line!r}\n{finished.stderr}") from None
    messages = [r["message"] for r in records]
    assert any("efficientnet-lite0 ready" in m for m in messages), messages
    # No progress bar, not even as records ("Batches: 100%|###| 1/1" per embedding call).
    assert not [m for m in messages if "it/s" in m or "%|" in m], messages
    # What the loader printed is a record of the worker's, not lost.
    [printed] = [r for r in records if r["message"].startswith("Loaded pretrained weights")]
    assert printed["logger"] == "backend.inference.pool"
