"""The transformer injection classifier: `metatronnanoguard` (NanoGuard, a 16.8M-parameter
bidirectional transformer trained on public injection datasets; MIT; about 80 ms a message on
one CPU thread) in a worker process of its own, so torch never runs on the event loop nor holds
the API process's GIL.

One owner (`TransformerClassifier`) starts the worker on first use, gives each call a deadline,
and kills a worker that overruns it (the next call starts a fresh one); closing it ends the
worker. The server never imports the package: `nanoguard/__init__` imports torch.

A long text is read at its start and its end (the model reads at most 512 tokens), as the
packaged TF-IDF classifier is.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import math
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from backend.core.tasks import cancel_and_wait
from backend.guardrails.errors import GuardrailUnavailable
from backend.inference.lifeline import die_with_parent, worker_pool
from backend.inference.worker_output import log_worker_output

log = logging.getLogger(__name__)

PACKAGE = "nanoguard"  # the import name of metatronnanoguard==0.1.0
NAME = "metatronnanoguard@0.1.0"


def package_path() -> str:
    """Where the classifier's package lies (found without importing it: it imports torch)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the injection classifier is missing: pip install metatronnanoguard"
        )
    return spec.origin


class ClassifierUnavailable(GuardrailUnavailable):
    """The worker failed or overran its deadline."""


# -- the worker process ------------------------------------------------------------------------

_SCANNER: Any = None


def _load(threads: int, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    log_worker_output(__name__)
    import torch
    from nanoguard import NanoGuard

    torch.set_num_threads(threads)
    global _SCANNER  # noqa: PLW0603 (one model per worker process)
    _SCANNER = NanoGuard(device="cpu")


def _scan(texts: list[str]) -> list[float]:
    # The model was trained on inputs padded to its full length (its attention reads the
    # padding), so it runs as the package runs it: scan_batch pads every text to 512 tokens.
    return [float(r.injection_score) for r in _SCANNER.scan_batch(texts)]


def clip(text: str, chars: int) -> str:
    """The start and the end of a long text, `chars` in all."""
    if len(text) <= chars:
        return text
    half = chars // 2
    return text[:half] + " " + text[-half:]


class TransformerClassifier:
    """Probabilities that texts are injections, from NanoGuard in one worker process."""

    name = NAME

    def __init__(self, *, threads: int = 1, timeout_s: float = 2.0, max_chars: int = 2000) -> None:
        package_path()  # a broken install fails at startup, not on the first message
        self._threads = threads
        self._timeout_s = timeout_s
        self._max_chars = max_chars
        self._pool: ProcessPoolExecutor | None = None
        self._lock = asyncio.Lock()  # one batch at a time: the worker is single-threaded
        self._ready = False  # the worker has the model loaded
        self._warming: asyncio.Task[None] | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = worker_pool(_load, self._threads)
        return self._pool

    async def warm(self, timeout_s: float = 120.0) -> None:
        """Starts the worker and loads the model (seconds), so the first message is fast."""
        await self._run(["warm up"], timeout_s)
        self._ready = True

    async def _warm_in_background(self) -> None:
        try:
            await self.warm()
        except ClassifierUnavailable as exc:
            log.warning("injection classifier did not start: %s", exc)

    async def probabilities(self, texts: list[str]) -> list[float]:
        """Each text's probability of being an injection. A worker that is not ready (not
        warmed, or replaced after a failure) is started in the background and this call fails
        at once: loading takes longer than a message may wait."""
        if not texts:
            return []
        if not self._ready:
            if self._warming is None or self._warming.done():
                self._warming = asyncio.create_task(
                    self._warm_in_background(), name="injection-classifier-warm"
                )
            raise ClassifierUnavailable("the injection classifier is starting")
        return await self._run([clip(t, self._max_chars) for t in texts], self._timeout_s)

    async def _run(self, texts: list[str], timeout_s: float) -> list[float]:
        loop = asyncio.get_running_loop()
        async with self._lock:
            pool = self._executor()
            future = loop.run_in_executor(pool, _scan, texts)
            try:
                return await asyncio.wait_for(future, timeout_s)
            except TimeoutError as exc:
                self._kill(pool)  # a stuck worker would hold every later message
                raise ClassifierUnavailable("the injection classifier took too long") from exc
            except (BrokenProcessPool, OSError) as exc:
                self._kill(pool)
                raise ClassifierUnavailable("the injection classifier's worker died") from exc
            except asyncio.CancelledError:
                # the caller gave up (its own deadline): the batch may still be running; a
                # fresh worker serves the next call rather than queueing behind it
                self._kill(pool)
                raise

    def _kill(self, pool: ProcessPoolExecutor) -> None:
        if self._pool is pool:
            self._pool = None
            self._ready = False
        processes = list((getattr(pool, "_processes", None) or {}).values())
        for process in processes:
            with contextlib.suppress(OSError, ValueError):
                process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        log.warning("injection classifier worker stopped; the next call starts a fresh one")

    async def close(self) -> None:
        if self._warming is not None:
            await cancel_and_wait([self._warming])
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)


# The ensemble: logistic regression over the transformer's logit, the message's length (log
# characters) and the cheap rails' score, fitted on bench/data/prompts.jsonl (the team's own
# labelled set; the held-out families of bench/data/families.jsonl were never fitted on).
# bench/guardrails.py prints the figures; refit there when a model or a rail changes.
_WEIGHTS = (0.3051, 1.5527, 3.5152, -9.4580)


def calibrated(cheap: float, probability: float, chars: int) -> float:
    """The ensemble's probability that a message is an attack."""
    p = min(max(probability, 1e-6), 1 - 1e-6)
    w_logit, w_length, w_cheap, bias = _WEIGHTS
    z = w_logit * math.log(p / (1 - p)) + w_length * math.log(max(chars, 1)) + w_cheap * cheap
    return 1.0 / (1.0 + math.exp(-(z + bias)))
