"""Image decoding with errors that name the file, and an in-memory preload for small data sets."""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageReadError(RuntimeError):
    """An image file exists but cannot be decoded."""


def load_rgb(path: str | Path, min_side: int | None = None) -> np.ndarray:
    """Decode ``path`` to an RGB uint8 HWC array.

    With ``min_side`` the image is shrunk (aspect kept) so its shorter side is ``min_side``;
    JPEG decoding then uses the decoder's fast DCT scaling (``draft``).
    """
    try:
        with Image.open(path) as img:
            if min_side is not None:
                scale = min_side / min(img.size)
                if scale < 1:
                    target = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
                    img.draft("RGB", target)
            img = img.convert("RGB")
            if min_side is not None and min(img.size) != min_side:
                scale = min_side / min(img.size)
                img = img.resize(
                    (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))),
                    Image.BILINEAR,
                )
            return np.asarray(img)
    except FileNotFoundError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise ImageReadError(
            f"cannot decode image {path}: {err}. The file is corrupt or not an image: replace it, "
            "or remove its row from the index CSV"
        ) from err


def preload_images(paths: Sequence[str], image_size: int, workers: int = 4) -> list[np.ndarray]:
    """Decode every image once, shrunk so the shorter side is ~1.15 x the training size.

    The margin leaves room for random resized crops; at 64 px HAM10000 takes ~200 MB.
    """
    min_side = math.ceil(image_size * 1.15)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: load_rgb(p, min_side), paths, chunksize=64))


def find_missing(paths: Sequence[str]) -> list[int]:
    """Positions of paths that do not exist (checked before training, not mid-epoch)."""
    return [i for i, p in enumerate(paths) if not Path(p).is_file()]
