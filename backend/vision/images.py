"""Image input: the real format sniffed from the bytes, limits on bytes, pixels and frames (a
decompression bomb is refused before it is decoded), EXIF orientation applied, RGB out."""

from __future__ import annotations

import io
import warnings
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
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"the image has {width * height} pixels (most: {max_pixels})",
                    limit=max_pixels,
                )
            frames = int(getattr(image, "n_frames", 1) or 1)
            if frames > 1 and animated == "reject":
                raise UnsupportedImage("animated images are refused on this server")
            image.seek(0)
            image = ImageOps.exif_transpose(image)
            rgb = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnsupportedImage("not an image in a supported format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImage(f"the image is damaged: {exc}") from None
    return DecodedImage(rgb, media_type, rgb.shape[1], rgb.shape[0], frames)
