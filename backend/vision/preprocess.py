"""OpenCV preprocessing: model inputs for classification and detection, and the clean-up that
OCR needs (grayscale, denoise, adaptive threshold, deskew)."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np


def classification_input(rgb: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Resize the short side, centre-crop to `size`, normalise: a CHW float32 array."""
    size = int(spec.get("size", 224))
    height, width = rgb.shape[:2]
    scale = size * 1.143 / min(height, width)  # 256/224, the usual ImageNet crop ratio
    resized = cv2.resize(
        rgb,
        (max(size, round(width * scale)), max(size, round(height * scale))),
        interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR,
    )
    top = (resized.shape[0] - size) // 2
    left = (resized.shape[1] - size) // 2
    crop = resized[top : top + size, left : left + size].astype(np.float32) / 255.0
    mean = np.asarray(spec.get("mean", [0.5, 0.5, 0.5]), dtype=np.float32)
    std = np.asarray(spec.get("std", [0.5, 0.5, 0.5]), dtype=np.float32)
    return ((crop - mean) / std).transpose(2, 0, 1).copy()


def detection_input(rgb: np.ndarray, spec: dict[str, Any]) -> tuple[np.ndarray, float]:
    """Grayscale, the long side at most `max_side`; and the scale back to the original."""
    max_side = int(spec.get("max_side", 1024))
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    longest = max(gray.shape)
    if longest <= max_side:
        return gray, 1.0
    scale = max_side / longest
    small = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return cv2.equalizeHist(small), 1 / scale


def detector_input(rgb: np.ndarray, runtime: str, spec: dict[str, Any]) -> np.ndarray:
    """What a detector takes: a cascade, the grayscale image (`detection_input`); a dnn graph,
    the RGB image resized to the graph's `width` x `height` (its boxes come back as fractions
    of the image, so no scale is kept)."""
    if runtime == "cascade":
        return detection_input(rgb, spec)[0]
    size = (int(spec.get("width", 300)), int(spec.get("height", 300)))
    height, width = rgb.shape[:2]
    shrink = width > size[0] or height > size[1]
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(rgb, size, interpolation=interpolation))


def ocr_input(rgb: np.ndarray, spec: dict[str, Any]) -> tuple[np.ndarray, float]:
    """An OCR model's input: the RGB image with its long side at most `max_side` (what the
    worker is sent stays bounded); and the scale back to the original."""
    max_side = int(spec.get("max_side", 2000))
    longest = max(rgb.shape[:2])
    if longest <= max_side:
        return np.ascontiguousarray(rgb), 1.0
    scale = max_side / longest
    small = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return small, 1 / scale


def for_ocr(rgb: np.ndarray) -> np.ndarray:
    """Grayscale, denoised, deskewed, then binarised with an adaptive threshold."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if max(gray.shape) < 1000:  # small text reads better enlarged
        gray = cv2.resize(gray, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    gray = cv2.medianBlur(gray, 3)
    gray = deskew(gray)
    return cv2.adaptiveThreshold(
        gray, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C, cv2.THRESH_BINARY, 31, 15
    )


def skew_angle(gray: np.ndarray, max_angle: float = 15.0) -> float:
    """The rotation that makes text lines horizontal: the angle whose row profile of dark
    pixels is the most peaked (lines and the gaps between them), coarse then fine."""
    scale = 400 / max(gray.shape)
    small = cv2.resize(gray, None, fx=scale, fy=scale) if scale < 1 else gray
    ink = (small < 128).astype(np.float32)
    if ink.sum() < 50:
        return 0.0
    height, width = ink.shape
    centre = (width / 2, height / 2)

    def peakedness(angle: float) -> float:
        matrix = cv2.getRotationMatrix2D(centre, angle, 1.0)
        return float(np.var(cv2.warpAffine(ink, matrix, (width, height)).sum(axis=1)))

    coarse = max(np.arange(-max_angle, max_angle + 0.1, 1.0), key=peakedness)
    return float(max(np.arange(coarse - 1, coarse + 1.01, 0.25), key=peakedness))


def deskew(gray: np.ndarray, max_angle: float = 15.0) -> np.ndarray:
    angle = skew_angle(gray, max_angle)
    if abs(angle) < 0.5:
        return gray
    height, width = gray.shape
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
    return cv2.warpAffine(
        gray, matrix, (width, height), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE
    )
