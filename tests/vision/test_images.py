"""Image input and preprocessing on their own."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from backend.errors import PayloadTooLarge
from backend.vision.images import DecodeBudget, UnreadableImage, UnsupportedImage, decode
from backend.vision.preprocess import classification_input, skew_angle

LIMITS = {"max_bytes": 1_000_000, "max_pixels": 1_000_000}


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_formats_are_sniffed_not_trusted() -> None:
    png = encoded(Image.new("RGB", (40, 30), "red"), "PNG")
    image = decode(png, **LIMITS)
    assert (image.media_type, image.width, image.height) == ("image/png", 40, 30)
    assert image.rgb.shape == (30, 40, 3)
    with pytest.raises(UnsupportedImage):
        decode(b"%PDF-1.7 this is not an image at all", **LIMITS)
    with pytest.raises(UnsupportedImage):
        decode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, **LIMITS)  # a header and nothing else
    with pytest.raises(UnreadableImage):
        decode(b"", **LIMITS)


def test_byte_and_pixel_limits_refuse_before_decoding() -> None:
    big = encoded(Image.new("L", (2000, 2000)), "PNG")  # small file, four million pixels
    with pytest.raises(PayloadTooLarge, match="pixels"):
        decode(big, **LIMITS)
    with pytest.raises(PayloadTooLarge, match="bytes"):
        decode(big, max_bytes=100, max_pixels=10**9)


def test_animation_first_frame_or_refused() -> None:
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "blue", "green")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    gif = buffer.getvalue()
    first = decode(gif, **LIMITS)
    assert first.frames == 3
    assert tuple(first.rgb[0, 0]) == (255, 0, 0)
    with pytest.raises(UnsupportedImage, match="animated"):
        decode(gif, **LIMITS, animated="reject")


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (60, 20), "white")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    upright = decode(encoded(image, "JPEG", exif=exif), **LIMITS)
    assert (upright.width, upright.height) == (20, 60)


def test_classification_input_and_skew() -> None:
    x = classification_input(np.zeros((300, 500, 3), dtype=np.uint8), {"size": 224})
    assert x.shape == (3, 224, 224)
    assert x.dtype == np.float32
    font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", 28)
    page = Image.new("L", (600, 200), 255)
    draw = ImageDraw.Draw(page)
    draw.text((20, 30), "A line of text to straighten", font=font, fill=0)
    draw.text((20, 110), "and another one below it", font=font, fill=0)
    tilted = np.asarray(page.rotate(7, expand=True, fillcolor=255))
    assert abs(skew_angle(tilted) + 7) <= 0.5


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` (with a valid CRC) over a tiny body."""
    png = bytearray(encoded(Image.new("L", (4, 4)), "PNG"))
    ihdr = bytes(png[12:16]) + struct.pack(">II", width, height) + bytes(png[24:29])
    png[16:29] = ihdr[4:]
    png[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(png)


def test_pixel_bombs_are_refused_by_the_pixel_limit() -> None:
    """Pillow's own bomb guard (over ~179 million pixels it refuses on the header) answers
    like our limit: PAYLOAD_TOO_LARGE about pixels, not "not an image"."""
    for bomb in [png_claiming(20_000, 20_000), png_claiming(10_000, 10_000)]:
        with pytest.raises(PayloadTooLarge, match="pixels") as refused:
            decode(bomb, max_bytes=1_000_000, max_pixels=10**12)
        assert refused.value.details["unit"] == "pixels"


def test_a_truncated_jpeg_claiming_a_huge_size_is_refused_from_its_header() -> None:
    """1-2 KB of JPEG whose header says 6000 x 6000: refused by the live limit before any
    pixel is decoded (decoding it takes seconds)."""
    whole = encoded(Image.new("RGB", (6000, 6000), "gray"), "JPEG", quality=10)
    truncated = whole[:1800]
    with pytest.raises(PayloadTooLarge, match="36000000 pixels"):
        decode(truncated, max_bytes=2_000_000, max_pixels=3840 * 2160)


def test_the_decode_budget_refills_at_its_share() -> None:
    now = [0.0]
    budget = DecodeBudget(share=0.5, burst_s=1.0, clock=lambda: now[0])
    assert budget.wait_s() == 0
    budget.started()
    assert budget.wait_s() > 0  # still decoding (the frame timed out, the thread goes on)
    budget.spend(3.0)  # a 3-second bomb: 2 seconds in debt
    assert budget.wait_s() == pytest.approx(4.0)  # refilled at half a second a second
    now[0] = 3.0
    assert budget.wait_s() == pytest.approx(1.0)
    now[0] = 100.0
    assert budget.wait_s() == 0
    budget.started()
    budget.spend(1.5)  # the burst (1 s) is the most saved up: 0.5 s in debt
    assert budget.wait_s() == pytest.approx(1.0)
