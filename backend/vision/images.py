"""Image input: the real format sniffed from the bytes, limits on bytes, pixels and frames (a
decompression bomb is refused before it is decoded), EXIF orientation applied, RGB out; and
the decode time a live connection may spend."""

from __future__ import annotations

import io
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.errors import AppError, PayloadTooLarge

FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif",
           "BMP": "image/bmp", "TIFF": "image/tiff"}  # fmt: skip


class UnsupportedImage(AppError):
    code = "UNSUPPORTED_MEDIA_TYPE"
    status = 415


class UnreadableImage(AppError):
    code = "UNREADABLE_IMAGE"
    status = 422


@dataclass(frozen=True)
class DecodedImage:
    rgb: np.ndarray  # height x width x 3, uint8
    media_type: str
    width: int
    height: int
    frames: int


def decode(
    data: bytes, *, max_bytes: int, max_pixels: int, animated: str = "first_frame"
) -> DecodedImage:
    """Raises PayloadTooLarge, UnsupportedImage or UnreadableImage; never decodes a bomb."""
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"the image is over {max_bytes} bytes", limit=max_bytes)
    if not data:
        raise UnreadableImage("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
            media_type = FORMATS.get(str(image.format))
            if media_type is None:
                raise UnsupportedImage(
                    f"{image.format or 'this'} images are not supported; "
                    f"send {', '.join(sorted(FORMATS))}"
                )
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > max_pixels:
                raise _too_many_pixels(f"the image has {width * height} pixels", max_pixels)
            frames = int(getattr(image, "n_frames", 1) or 1)
            if frames > 1 and animated == "reject":
                raise UnsupportedImage("animated images are refused on this server")
            image.seek(0)
            image = ImageOps.exif_transpose(image)
            rgb = np.asarray(image.convert("RGB"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own bomb guard fired first (on the header, or on a later frame)
        raise _too_many_pixels("the image has too many pixels", max_pixels) from None
    except UnidentifiedImageError:
        raise UnsupportedImage("not an image in a supported format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImage(f"the image is damaged: {exc}") from None
    return DecodedImage(rgb, media_type, rgb.shape[1], rgb.shape[0], frames)


def _too_many_pixels(what: str, max_pixels: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{what} (most: {max_pixels})", limit=max_pixels, unit="pixels")


class DecodeBudget:
    """The decode time one live connection may spend: a bucket of CPU seconds that refills at
    `share` seconds a second (a share of one core) up to `burst_s`. The decoding thread
    charges what a frame cost when it finishes, even after the frame timed out, so a frame
    that is cheap to send and costly to decode is paid for by its sender, not by the others."""

    def __init__(
        self, share: float, burst_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._share = share
        self._burst_s = burst_s
        self._clock = clock
        self._tokens = burst_s
        self._at = clock()
        self._decoding = 0
        self._lock = threading.Lock()  # charged from decoding threads

    def wait_s(self) -> float:
        """How long until the connection may decode its next frame (0: now)."""
        with self._lock:
            if self._decoding:
                return 0.05  # its last frame is still being decoded (it timed out)
            self._refill()
            return 0.0 if self._tokens > 0 else -self._tokens / self._share

    def started(self) -> None:
        with self._lock:
            self._decoding += 1

    def spend(self, seconds: float) -> None:
        with self._lock:
            self._decoding -= 1
            self._refill()
            self._tokens -= seconds

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst_s, self._tokens + (now - self._at) * self._share)
        self._at = now
