"""Image input and preprocessing on their own."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from backend.errors import PayloadTooLarge
from backend.vision.images import UnreadableImage, UnsupportedImage, decode
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
