"""Vision quality: what the default models get right, and how long they take, on this machine.

- OCR: character error rate (edit distance / reference length, whitespace runs counted as one
  space) of Tesseract and RapidOCR side by side, on pages rendered from prose found on the
  machine (the licence texts of /usr/share/common-licenses) in DejaVu Sans, Serif and Sans Mono
  at several sizes: clean, rotated 3-8 degrees, blurred, noisy, and photographed (a perspective
  warp, uneven light, blur and JPEG). Latency: p50 seconds per page.
- Detection: SSD-MobileNetV2 (COCO) on six of scikit-image's photos, each with the object it
  shows written down: found with score >= 0.5 or not. Latency p50 per image, beside the face
  cascade's on the same photos.
- Classification: EfficientNet-Lite0 top-1 on the same photos (the ImageNet classes that name
  what each shows), latency p50 per image.

Every model runs as the server runs it: the vision service's `read`, `detect` and `classify`
on an inference pool of the packaged manifests (worker processes, batchers), Tesseract on the
service's OCR threads; requests one at a time (latency, not throughput). Beside the wall-clock
p50, the CPU each request took (mean): the worker processes' and this process's (preprocessing,
Tesseract's threads), which a loaded machine does not inflate. The worker has the server's
threads (`SIGHTLINE_VISION_THREADS`, by default the cores) unless `--threads` says. One table is
printed.

Usage: python bench/vision_quality.py [--quick] [--threads N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import re
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from redis.asyncio import Redis

from backend.config import LimitsSettings, VisionSettings
from backend.core.redis import KeySpace
from backend.inference.manifest import load_manifests
from backend.inference.pool import InferencePool
from backend.lifecycle.shadow import character_error_rate
from backend.limits.ratelimit import RateLimiter
from backend.vision.ocr import OcrEngine
from backend.vision.service import TESSERACT, VisionService

LICENCES = Path("/usr/share/common-licenses")
FONTS = Path("/usr/share/fonts/truetype/dejavu")
OCR_ENGINES = (TESSERACT, "rapidocr")
DETECTOR, FACES, CLASSIFIER = "ssd-mobilenet-v2-coco", "haar-frontalface", "efficientnet-lite0"
VARIANTS = ("clean", "rotated", "blurred", "noisy", "photographed")

# scikit-image photo -> (the COCO object it shows, the ImageNet classes that name it)
PHOTOS: dict[str, tuple[str, set[str]]] = {
    "astronaut": ("person", {"space shuttle", "suit", "military uniform", "crash helmet"}),
    "coffee": ("cup", {"cup", "espresso", "coffee mug"}),
    "chelsea": ("cat", {"tabby", "tiger cat", "Egyptian cat"}),
    "stereo_motorcycle": ("motorcycle", {"moped", "motor scooter", "crash helmet"}),
    "horse": ("horse", {"sorrel"}),
    "camera": ("person", {"tripod", "reflex camera", "Polaroid camera"}),
}


# -- OCR pages -------------------------------------------------------------------------------


def prose(words_wanted: int, seed: int) -> list[str]:
    """Paragraphs of the machine's licence texts (ASCII, no rulers or blank lines), from a
    seeded position: about `words_wanted` words."""
    texts = []
    for path in sorted(LICENCES.glob("*")):
        if path.is_file():
            text = path.read_text("utf-8", errors="ignore")
            text = text.encode("ascii", errors="ignore").decode()
            texts.append(text)
    words: list[str] = []
    for text in texts:
        for raw in text.splitlines():
            line = raw.strip()
            if len(line) > 20 and not re.search(r"(.)\1{4,}", line):  # rulers: ---- ====
                words += line.split()
    start = random.Random(seed).randrange(0, max(1, len(words) - words_wanted))
    return words[start : start + words_wanted]


def render(words: list[str], font_file: str, size: int, width: int = 1100) -> tuple[Any, str]:
    """A page of the words wrapped to `width` px, and its reference text (lines)."""
    font = ImageFont.truetype(str(FONTS / font_file), size)
    lines, line = [], ""
    for word in words:
        wider = f"{line} {word}".strip()
        if font.getlength(wider) > width - 80 and line:
            lines.append(line)
            line = word
        else:
            line = wider
    if line:
        lines.append(line)
    spacing = round(size * 1.6)
    page = Image.new("RGB", (width, 80 + spacing * len(lines)), "white")
    draw = ImageDraw.Draw(page)
    for index, text in enumerate(lines):
        draw.text((40, 40 + index * spacing), text, font=font, fill=(20, 20, 20))
    return page, "\n".join(lines)


def variant(page: Image.Image, kind: str, rng: random.Random) -> np.ndarray:
    if kind == "rotated":
        angle = rng.uniform(3, 8) * rng.choice((-1, 1))
        page = page.rotate(angle, expand=True, fillcolor="white", resample=Image.BICUBIC)
    rgb = np.asarray(page).copy()
    if kind == "blurred":
        rgb = cv2.GaussianBlur(rgb, (0, 0), 1.3)
    elif kind == "noisy":
        noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0, 28, rgb.shape)
        rgb = np.clip(rgb + noise, 0, 255).astype(np.uint8)
    elif kind == "photographed":
        height, width = rgb.shape[:2]
        d = 0.06
        corners = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
        moved = np.float32(
            [
                [width * rng.uniform(0, d), height * rng.uniform(0, d)],
                [width * (1 - rng.uniform(0, d)), height * rng.uniform(0, d)],
                [width * (1 - rng.uniform(0, d)), height * (1 - rng.uniform(0, d))],
                [width * rng.uniform(0, d), height * (1 - rng.uniform(0, d))],
            ]
        )
        matrix = cv2.getPerspectiveTransform(corners, moved)
        rgb = cv2.warpPerspective(
            rgb, matrix, (width, height), borderValue=(90, 80, 70), flags=cv2.INTER_LINEAR
        )
        light = np.linspace(1.0, 0.7, width, dtype=np.float32)[None, :, None]  # a lamp on the left
        rgb = np.clip(rgb.astype(np.float32) * light, 0, 255).astype(np.uint8)
        rgb = cv2.GaussianBlur(rgb, (0, 0), 0.8)
        _, jpeg = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, 80])
        rgb = cv2.imdecode(jpeg, cv2.IMREAD_UNCHANGED)
    return np.ascontiguousarray(rgb)


# -- the service -----------------------------------------------------------------------------


def service(pool: InferencePool, settings: VisionSettings) -> VisionService:
    """The server's vision service on the pool. Its jobs' database is not needed here: `read`,
    `detect` and `classify` use the models alone (the Redis client is never connected)."""
    redis = Redis()
    keys = KeySpace("bench-vision-quality")
    return VisionService(
        db=None,  # type: ignore[arg-type]
        redis=redis,
        keys=keys,
        inference=pool,
        ocr=OcrEngine(settings.tessdata, settings.ocr_threads),
        limiter=RateLimiter(redis, keys, LimitsSettings(enabled=False)),
        settings=settings,
    )


def cpu_seconds() -> float:
    """CPU seconds of this process (every thread) and of its children alive now: the pool's
    workers (from /proc, in clock ticks)."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for child in multiprocessing.active_children():
        try:
            stat = Path(f"/proc/{child.pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


async def timed(
    call: Callable[[], Awaitable[Any]], cpu: list[float] | None = None
) -> tuple[Any, float]:
    """The call's result and wall seconds; its CPU seconds appended to `cpu`."""
    used = cpu_seconds()
    started = time.perf_counter()
    result = await call()
    took = time.perf_counter() - started
    if cpu is not None:
        cpu.append(cpu_seconds() - used)
    return result, took


def photo(name: str) -> np.ndarray:
    from skimage import data

    image = getattr(data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    image = np.asarray(image)
    if image.dtype == bool:  # horse: a silhouette
        image = np.where(image, 255, 0).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def main(args: argparse.Namespace) -> None:
    settings = VisionSettings(workers=1, **({"threads": args.threads} if args.threads else {}))
    threads = settings.worker_threads()
    wanted = {*OCR_ENGINES, DETECTOR, FACES, CLASSIFIER} - {TESSERACT}
    manifests = [m for m in load_manifests(None) if m.name in wanted]
    pool = InferencePool(manifests, workers=1, threads=threads)
    started = time.perf_counter()
    await pool.start()
    await pool.wait_ready(timeout_s=600)
    failed = {n: s.error for n, s in pool.status().items() if s.status.value != "ready"}
    if failed:
        raise SystemExit(f"models not served: {failed}")
    vision = service(pool, settings)
    load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    warm = time.perf_counter() - started
    print(f"models warm in {warm:.1f} s (1 worker x {threads} threads); {load}", flush=True)

    # OCR: the same pages for both engines
    fonts = (
        [("DejaVuSans.ttf", 22)]
        if args.quick
        else [
            ("DejaVuSans.ttf", 16),
            ("DejaVuSans.ttf", 24),
            ("DejaVuSerif.ttf", 18),
            ("DejaVuSerif.ttf", 28),
            ("DejaVuSansMono.ttf", 16),
            ("DejaVuSansMono.ttf", 22),
        ]
    )
    errors: dict[tuple[str, str], list[float]] = {}
    seconds: dict[tuple[str, str], list[float]] = {}
    ocr_cpu: dict[str, list[float]] = {}
    pages = 0
    for index, (font, size) in enumerate(fonts):
        words = prose(70 if args.quick else 110, seed=index)
        page, reference = render(words, font, size)
        for kind in VARIANTS:
            image = variant(page, kind, random.Random(f"{index}-{kind}"))
            pages += 1
            for engine in OCR_ENGINES:
                result, took = await timed(
                    lambda engine=engine, image=image: vision.read(image, engine),
                    ocr_cpu.setdefault(engine, []),
                )
                errors.setdefault((engine, kind), []).append(
                    character_error_rate(result["text"], reference)
                )
                seconds.setdefault((engine, kind), []).append(took)
        print(f"  OCR: {font} {size} px, {len(VARIANTS)} variants read", flush=True)

    # detection and classification: the same photos, one request at a time
    found: dict[str, tuple[bool, float]] = {}
    top1: dict[str, tuple[bool, str]] = {}
    detect_s: list[float] = []
    faces_s: list[float] = []
    classify_s: list[float] = []
    detect_cpu: list[float] = []
    faces_cpu: list[float] = []
    classify_cpu: list[float] = []
    for name, (label, classes) in PHOTOS.items():
        rgb = photo(name)
        for _ in range(args.repeats):
            objects, took = await timed(lambda rgb=rgb: vision.detect(rgb, DETECTOR), detect_cpu)
            detect_s.append(took)
            _, took = await timed(lambda rgb=rgb: vision.detect(rgb, FACES), faces_cpu)
            faces_s.append(took)
            classified, took = await timed(
                lambda rgb=rgb: vision.classify(rgb, CLASSIFIER, 1), classify_cpu
            )
            classify_s.append(took)
        scores = [o["score"] for o in objects["objects"] if o["label"] == label]
        best = max(scores, default=0.0)
        found[name] = (best >= 0.5, best)
        guess = classified["classes"][0]["label"]
        top1[name] = (guess in classes, guess)

    await vision.close(1)
    await pool.close()

    def percent(engine: str, kind: str) -> str:
        return f"{100 * statistics.mean(errors[engine, kind]):.2f}%"

    rows: list[tuple[str, str, str, str, str]] = []
    per_variant = len(fonts)
    best_clean = min(statistics.mean(errors[e, "clean"]) for e in OCR_ENGINES)
    for kind in VARIANTS:
        target = ""
        if kind == "clean":
            met = "met" if best_clean <= 0.03 else "NOT met"
            target = f"better engine <= 3%: {met} ({100 * best_clean:.2f}%)"
        rows.append(
            (
                f"OCR CER, {kind} ({per_variant} pages)",
                "rapidocr",
                percent("rapidocr", kind),
                f"tesseract {percent(TESSERACT, kind)}",
                target,
            )
        )
    every = {e: [s for (n, _), v in seconds.items() if n == e for s in v] for e in OCR_ENGINES}
    rapid_page = p50(every["rapidocr"])
    rows.append(
        (
            f"OCR p50 per page ({pages} pages)",
            "rapidocr",
            f"{rapid_page:.2f} s",
            f"tesseract {p50(every[TESSERACT]):.2f} s",
            f"RapidOCR page <= 1 s: {'met' if rapid_page <= 1 else 'NOT met'}",
        )
    )
    rows.append(
        (
            f"OCR CPU per page, mean ({pages} pages)",
            "rapidocr",
            f"{statistics.mean(ocr_cpu['rapidocr']):.2f} s",
            f"tesseract {statistics.mean(ocr_cpu[TESSERACT]):.2f} s",
            "",
        )
    )
    hits = sum(ok for ok, _ in found.values())
    rows.append(
        (
            f"detection, expected object at score >= 0.5 ({len(PHOTOS)} photos)",
            DETECTOR,
            f"{hits}/{len(PHOTOS)}: "
            + ", ".join(
                f"{name} {PHOTOS[name][0]} {score:.2f}" for name, (_, score) in found.items()
            ),
            "",
            f">= 5 of 6: {'met' if hits >= 5 else 'NOT met'}",
        )
    )
    detect_p50 = p50(detect_s) * 1000
    rows.append(
        (
            f"detection p50 per image ({len(detect_s)} requests)",
            DETECTOR,
            f"{detect_p50:.0f} ms",
            f"{FACES} {p50(faces_s) * 1000:.0f} ms",
            f"<= 150 ms: {'met' if detect_p50 <= 150 else 'NOT met'}",
        )
    )
    rows.append(
        (
            f"detection CPU per image, mean ({len(detect_cpu)} requests)",
            DETECTOR,
            f"{statistics.mean(detect_cpu) * 1000:.0f} ms",
            f"{FACES} {statistics.mean(faces_cpu) * 1000:.0f} ms",
            "",
        )
    )
    right = sum(ok for ok, _ in top1.values())
    rows.append(
        (
            f"classification top-1 ({len(PHOTOS)} photos)",
            CLASSIFIER,
            f"{right}/{len(PHOTOS)}: "
            + ", ".join(f"{name} {guess!r}" for name, (_, guess) in top1.items()),
            "",
            "",
        )
    )
    rows.append(
        (
            f"classification p50 per image ({len(classify_s)} requests)",
            CLASSIFIER,
            f"{p50(classify_s) * 1000:.0f} ms",
            f"CPU {statistics.mean(classify_cpu) * 1000:.0f} ms (mean)",
            "",
        )
    )
    print(
        f"\nload average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
        f"1 worker x {threads} threads"
    )
    print("| measure | model | result | beside it (same run) | target |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one font and size, 1 repeat")
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU threads of the worker (0: as the server)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each photo")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.repeats = 1
    asyncio.run(main(arguments))
