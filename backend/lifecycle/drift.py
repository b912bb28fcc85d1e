"""Drift samples per model version: the signals, their recording on the request path (memory
only, a few operations, bounded) and their windows in Redis, shared by every replica.

Per version and signal, Redis keeps the first `reference_size` samples (the reference, unless an
operator pins a window of the history) and the latest `history_size` (the newest `window_size`
of which are the current window). Each sample carries the time it was taken, so a window can be
pinned by time. `backend.lifecycle.drift_watch` compares the windows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import quote

import numpy as np
from redis.asyncio import Redis

from backend.config import DriftSettings
from backend.core.redis import KeySpace
from backend.core.tasks import Periodic

log = logging.getLogger(__name__)


class Kind(StrEnum):
    NUMBER = "number"  # compared by PSI (thresholded), KS and Jensen-Shannon
    CATEGORY = "category"  # PSI (thresholded) and Jensen-Shannon of the category shares
    VECTOR = "vector"  # the centroids' cosine distance (thresholded) and MMD


@dataclass(frozen=True, slots=True)
class Signal:
    name: str
    direction: str  # "input" | "output"
    kind: Kind

    @property
    def statistic(self) -> str:
        """The statistic its threshold applies to."""
        return "centroid" if self.kind is Kind.VECTOR else "psi"


SIGNALS: dict[str, Signal] = {
    s.name: s
    for s in (
        # vision inputs (every model that looked at the image)
        Signal("image_brightness", "input", Kind.NUMBER),
        Signal("image_contrast", "input", Kind.NUMBER),
        Signal("image_pixels", "input", Kind.NUMBER),
        Signal("image_aspect", "input", Kind.NUMBER),
        # vision outputs
        Signal("class", "output", Kind.CATEGORY),
        Signal("detections", "output", Kind.NUMBER),
        Signal("detection_score", "output", Kind.NUMBER),
        Signal("ocr_confidence", "output", Kind.NUMBER),
        # chat (per alias version)
        Signal("prompt_length", "input", Kind.NUMBER),
        Signal("answer_length", "output", Kind.NUMBER),
        Signal("refusal", "output", Kind.CATEGORY),
        Signal("guardrail_block", "output", Kind.CATEGORY),
        # knowledge search (per embedding model version)
        Signal("query_length", "input", Kind.NUMBER),
        Signal("query_embedding", "input", Kind.VECTOR),
        Signal("retrieval_top_score", "output", Kind.NUMBER),
    )
}

# Scores of at most this many objects per image: a crowded image must not fill the window alone.
_MAX_SCORES_PER_IMAGE = 10
# Image statistics read a grid of about this many pixels a side (a strided view of ~3,000
# values whatever the image's size: tens of microseconds).
_GRID = 32


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # epoch seconds
    value: float | str | np.ndarray


def encode(at: float, value: float | str | np.ndarray) -> bytes:
    if isinstance(value, np.ndarray):
        payload = value.astype(np.float32).tobytes()
    elif isinstance(value, str):
        payload = value.encode()
    else:
        payload = repr(float(value)).encode()
    return b"%.3f|" % at + payload


def decode(raw: bytes, kind: Kind) -> Sample:
    at, _, payload = raw.partition(b"|")
    if kind is Kind.VECTOR:
        value: float | str | np.ndarray = np.frombuffer(payload, dtype=np.float32)
    elif kind is Kind.CATEGORY:
        value = payload.decode(errors="replace")
    else:
        value = float(payload)
    return Sample(float(at), value)


Slot = tuple[str, str, str]  # model, version, signal


class DriftRecorder:
    """Gathers samples in memory on the request path (no I/O, no await); `DriftSamples`
    sends them to Redis in the background."""

    def __init__(self, settings: DriftSettings, *, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._clock = clock
        self._pending: dict[Slot, list[bytes]] = {}
        self._count = 0
        self.dropped = 0

    def add(self, model: str, version: str, signal: str, value: float | str | np.ndarray) -> None:
        """One sample of `signal` for `version` of `model`."""
        if self._count >= self._settings.max_pending:
            self.dropped += 1
            return
        self._count += 1
        self._pending.setdefault((model, version, signal), []).append(encode(self._clock(), value))

    def take(self) -> dict[Slot, list[bytes]]:
        """Everything gathered since the last take."""
        pending, self._pending, self._count = self._pending, {}, 0
        return pending

    # -- what each surface records -------------------------------------------------------

    def image(self, model: str, version: str, rgb: np.ndarray) -> None:
        """An image a vision model looked at: brightness and contrast (0..255, on a grid of
        its pixels), size in pixels, aspect (width / height)."""
        height, width = rgb.shape[:2]
        if not height or not width:
            return
        step = max(1, max(height, width) // _GRID)
        grid = rgb[::step, ::step].reshape(-1).astype(np.float32)
        mean = float(grid.mean())
        # one pass over the values (numpy's std takes three)
        spread = max(float(np.dot(grid, grid)) / grid.size - mean * mean, 0.0)
        self.add(model, version, "image_brightness", mean)
        self.add(model, version, "image_contrast", spread**0.5)
        self.add(model, version, "image_pixels", float(height * width))
        self.add(model, version, "image_aspect", width / height)

    def vision_result(self, model: str, version: str, result: Mapping[str, Any]) -> None:
        """A vision model's answer: the top class, the objects and their scores, or the mean
        confidence of the text lines read."""
        classes = result.get("classes")
        if classes:
            self.add(model, version, "class", str(classes[0].get("label", "")))
        objects = result.get("objects")
        if objects is not None:
            self.add(model, version, "detections", float(len(objects)))
            for found in objects[:_MAX_SCORES_PER_IMAGE]:
                self.add(model, version, "detection_score", float(found.get("score", 0.0)))
        lines = result.get("lines")
        if lines:
            confidences = [float(line.get("confidence", 0.0)) for line in lines]
            self.add(model, version, "ocr_confidence", sum(confidences) / len(confidences))

    def chat_turn(
        self,
        model: str,
        version: str,
        *,
        prompt_chars: int,
        answer_chars: int,
        rails: Sequence[Mapping[str, Any]] | None,
    ) -> None:
        """A chat turn's answer: prompt and answer lengths, whether the input rails refused it,
        whether any rail blocked."""
        rails = rails or []
        blocks = [r for r in rails if isinstance(r, Mapping) and r.get("action") == "block"]
        refused = any(r.get("stage") == "input" for r in blocks)
        self.add(model, version, "prompt_length", float(prompt_chars))
        self.add(model, version, "answer_length", float(answer_chars))
        self.add(model, version, "refusal", "1" if refused else "0")
        self.add(model, version, "guardrail_block", "1" if blocks else "0")

    def search(
        self,
        model: str,
        version: str,
        *,
        query_chars: int,
        vector: Sequence[float] | None,
        top_score: float | None,
    ) -> None:
        """A knowledge search: the query's length and embedding, the best hit's score."""
        self.add(model, version, "query_length", float(query_chars))
        if vector is not None:
            self.add(model, version, "query_embedding", np.asarray(vector, dtype=np.float32))
        if top_score is not None:
            self.add(model, version, "retrieval_top_score", float(top_score))


@dataclass(frozen=True, slots=True)
class Windows:
    """One version's samples of one signal: its reference and its current window."""

    reference: list[Sample]
    current: list[Sample]
    pinned: bool


@dataclass(frozen=True, slots=True)
class Pin:
    since: float
    until: float


class DriftSamples:
    """The windows in Redis: flushed from a recorder, read by the comparison, pinned by
    operators."""

    def __init__(
        self,
        redis: Redis,
        keys: KeySpace,
        settings: DriftSettings,
        recorder: DriftRecorder,
    ) -> None:
        self._redis = redis
        self._keys = keys.child("drift")
        self._settings = settings
        self.recorder = recorder
        self._flushes = Periodic(
            "drift samples flush",
            self.flush,
            interval_s=settings.flush_interval_s,
            timeout_s=settings.flush_timeout_s,
        )

    @property
    def _ttl_s(self) -> int:
        return self._settings.snapshot_retention_days * 86_400

    def _key(self, model: str, version: str, *parts: str) -> str:
        # quoted: a ':' in a model name cannot make two versions share a key
        return self._keys(quote(model, safe=""), quote(version, safe=""), *parts)

    async def flush(self) -> None:
        """Sends what the recorder gathered (one round trip); on failure it is lost."""
        pending = self.recorder.take()
        dropped, self.recorder.dropped = self.recorder.dropped, 0
        if dropped:
            log.warning("drift: %d samples dropped (SIGHTLINE_DRIFT_MAX_PENDING)", dropped)
        if not pending:
            return
        s, ttl = self._settings, self._ttl_s
        async with self._redis.pipeline(transaction=True) as pipe:
            versions = set()
            for (model, version, signal), values in pending.items():
                versions.add(json.dumps([model, version]))
                history = self._key(model, version, "history", signal)
                first = self._key(model, version, "first", signal)
                pipe.lpush(history, *values)  # newest first
                pipe.ltrim(history, 0, s.history_size - 1)
                pipe.rpush(first, *values)  # oldest first: the first ones stay
                pipe.ltrim(first, 0, s.reference_size - 1)
                pipe.expire(history, ttl)
                pipe.expire(first, ttl)
            pipe.sadd(self._keys("versions"), *versions)
            pipe.expire(self._keys("versions"), ttl)
            async with asyncio.timeout(s.flush_timeout_s):
                await pipe.execute()

    async def versions(self) -> list[tuple[str, str]]:
        """Every (model, version) with samples."""
        members = await self._redis.smembers(self._keys("versions"))
        return sorted(tuple(json.loads(m)) for m in members)  # type: ignore[misc]

    async def forget(self, model: str, version: str) -> None:
        """A version whose samples have all expired is no longer compared."""
        await self._redis.srem(self._keys("versions"), json.dumps([model, version]))

    async def windows(self, model: str, version: str) -> dict[str, Windows]:
        """Every signal's reference (pinned, else the first samples) and current window."""
        names = list(SIGNALS)
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.lrange(self._key(model, version, "pin", name), 0, -1)
                pipe.lrange(self._key(model, version, "first", name), 0, -1)
                pipe.lrange(self._key(model, version, "history", name), 0, self._window - 1)
            found = await pipe.execute()
        out = {}
        for i, name in enumerate(names):
            pinned, first, history = found[3 * i : 3 * i + 3]
            if not (pinned or first or history):
                continue
            kind = SIGNALS[name].kind
            out[name] = Windows(
                reference=[decode(raw, kind) for raw in (pinned or first)],
                current=[decode(raw, kind) for raw in history],
                pinned=bool(pinned),
            )
        return out

    @property
    def _window(self) -> int:
        return min(self._settings.window_size, self._settings.history_size)

    async def pin(self, model: str, version: str, since: float, until: float) -> int:
        """Makes the samples of the history taken between `since` and `until` the reference
        of every signal that has some; returns how many samples the largest one got."""
        names = list(SIGNALS)
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.lrange(self._key(model, version, "history", name), 0, -1)
            found = await pipe.execute()
        chosen: dict[str, list[bytes]] = {}
        for name, history in zip(names, found, strict=True):
            kept = [raw for raw in reversed(history) if since <= _at(raw) <= until]
            if kept:
                chosen[name] = kept[: self._settings.reference_size]
        if not chosen:
            return 0
        async with self._redis.pipeline(transaction=True) as pipe:
            for name in names:
                pipe.delete(self._key(model, version, "pin", name))
            for name, kept in chosen.items():
                key = self._key(model, version, "pin", name)
                pipe.rpush(key, *kept)
                pipe.expire(key, self._ttl_s)
            meta = self._key(model, version, "meta")
            pipe.hset(meta, mapping={"since": since, "until": until})
            pipe.expire(meta, self._ttl_s)
            await pipe.execute()
        return max(len(kept) for kept in chosen.values())

    async def restart_reference(self, model: str, version: str) -> None:
        """The version was promoted: its reference becomes the first samples it serves from
        now on, as live (those it served as a canary or a shadow saw other traffic). What this
        replica gathered before goes first; another replica's next flush may still add a few
        samples from before the promotion to the new reference. A pinned reference stays."""
        await self.flush()
        async with self._redis.pipeline(transaction=True) as pipe:
            for name in SIGNALS:
                pipe.delete(self._key(model, version, "first", name))
            pipe.hdel(self._key(model, version, "meta"), "exceeded")
            await pipe.execute()

    async def unpin(self, model: str, version: str) -> None:
        """Back to the first samples as the reference."""
        async with self._redis.pipeline(transaction=True) as pipe:
            for name in SIGNALS:
                pipe.delete(self._key(model, version, "pin", name))
            pipe.hdel(self._key(model, version, "meta"), "since", "until")
            await pipe.execute()

    async def pinned(self, model: str, version: str) -> Pin | None:
        found = await self._redis.hmget(self._key(model, version, "meta"), ["since", "until"])
        if found[0] is None or found[1] is None:
            return None
        return Pin(float(found[0]), float(found[1]))

    async def crossed(self, model: str, version: str, exceeded: Iterable[str]) -> set[str]:
        """Records which signals are over their threshold now; returns those that were not
        at the last comparison (the crossings)."""
        key = self._key(model, version, "meta")
        now = set(exceeded)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hget(key, "exceeded")
            pipe.hset(key, "exceeded", json.dumps(sorted(now)))
            pipe.expire(key, self._ttl_s)
            before_raw, _, _ = await pipe.execute()
        before = set(json.loads(before_raw)) if before_raw else set()
        return now - before

    def start(self) -> None:
        self._flushes.start()

    async def close(self) -> None:
        """Stops the flushes, then sends what is left (bounded by the flush timeout)."""
        await self._flushes.close()
        with contextlib.suppress(Exception):
            await self.flush()


def _at(raw: bytes) -> float:
    return float(raw.partition(b"|")[0])
