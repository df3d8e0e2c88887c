"""Decoding chest X-ray files to 8-bit grayscale: 8/16-bit PNG, gray, RGB(A), palette.

Radiographs are single-channel, but public releases mix formats: ChestX-ray14 ships mostly
8-bit gray PNGs with a few RGBA ones, DICOM exports are often 16-bit PNGs. Everything becomes a
``uint8 (H, W)`` array here; the channel count the backbone wants is made by
:func:`to_channels` (1 channel kept, or the gray channel replicated 3 times).

16-bit data is rescaled over its full range, ``round(v * 255 / 65535)`` (= v / 257), never
clipped: PIL's own ``convert("L")`` of an ``I;16`` image saturates every value above 255.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from medmetric.datamodules.images import (
    SIXTEEN_BIT_MODES,
    ImageReadError,
    open_image,
    sixteen_bit_to_uint8,
)


def to_uint8_gray(img: Image.Image, path: str | Path = "<image>") -> np.ndarray:
    """A decoded PIL image as ``uint8 (H, W)`` grayscale (alpha dropped, 16 bit rescaled)."""
    if img.mode in SIXTEEN_BIT_MODES:
        return sixteen_bit_to_uint8(img, path)
    if img.mode == "F":
        raise ImageReadError(f"{path}: floating-point images are not supported; save it as an 8- or 16-bit PNG")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGB" if img.mode in ("RGBA", "RGBa", "PA") else "L")  # drop alpha
    if img.mode != "L":
        img = img.convert("L")  # RGB (ITU-R 601 luma), palette, 1-bit, CMYK
    return np.asarray(img)


def load_xray(path: str | Path, min_side: int | None = None) -> np.ndarray:
    """Decode ``path`` to ``uint8 (H, W)``; with ``min_side`` shrink (aspect kept) so the
    shorter side is ``min_side`` (preloading small copies of 1024 px radiographs)."""
    with open_image(path) as img:
        gray = to_uint8_gray(img, path)
    if min_side is not None and min(gray.shape) > min_side:
        scale = min_side / min(gray.shape)
        size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
        gray = np.asarray(Image.fromarray(gray).resize(size, Image.BILINEAR))
    return gray


def to_channels(image: np.ndarray, in_chans: int) -> np.ndarray:
    """uint8 image -> ``(H, W, in_chans)``: a gray ``(H, W)`` image keeps its channel (1) or is
    replicated (3); an ``(H, W, in_chans)`` image is returned as is; RGB -> 1 channel is luma."""
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3 for grayscale X-rays (data.in_chans), got {in_chans}")
    if image.ndim == 3 and image.shape[2] == in_chans:
        return image
    if image.ndim == 3 and image.shape[2] == 3:  # RGB -> gray (ITU-R 601, as PIL's "L")
        image = np.rint(image @ np.array([0.299, 0.587, 0.114])).clip(0, 255).astype(np.uint8)
    elif image.ndim == 3:
        image = image[..., 0]
    return np.repeat(image[..., None], in_chans, axis=2)


def preload_xrays(paths: Sequence[str], image_size: int, workers: int = 4) -> list[np.ndarray]:
    """Decode every image once, shorter side ~1.15 x the training size (room for crops)."""
    min_side = math.ceil(image_size * 1.15)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: load_xray(p, min_side), paths, chunksize=64))


def gray_normalisation(in_chans: int) -> dict:
    """Mean/std for ``build_transform``: ImageNet's for 3 replicated channels, their average
    for one channel (what timm does when it adapts RGB weights to ``in_chans=1``)."""
    from medmetric.datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD

    if in_chans == 3:
        return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    return {"mean": (float(np.mean(IMAGENET_MEAN)),), "std": (float(np.mean(IMAGENET_STD)),)}
