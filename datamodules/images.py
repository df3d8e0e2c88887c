"""Image decoding with errors that name the file, and an in-memory preload for small data sets.

Every image becomes RGB uint8. Documented recoveries, each logged (once per kind and process,
since a whole grayscale data set would otherwise log every file; ``medmetric check-data``
counts them all):

* grayscale (``L``, ``1``): the channel is replicated to R, G and B;
* an alpha channel (``RGBA``, ``LA``, palette with transparency): alpha is dropped, the stored
  colour is kept as is (no compositing onto a background);
* 16-bit (``I;16``, ``I``): scaled by 255/65535 over the full 16-bit range (rounded, never
  clipped at 255), then replicated. 12-bit data stored in 16 bits therefore looks dark; the
  normalisation of the transform still centres it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_reported: set[str] = set()


class ImageReadError(RuntimeError):
    """An image file exists but cannot be decoded."""


def report_once(kind: str, message: str, *args) -> None:
    """Log a recovery the first time it happens in this process."""
    if kind not in _reported:
        _reported.add(kind)
        log.warning(message + " (reported once per process; `medmetric check-data` counts them all)", *args)


def sixteen_bit_to_uint8(img: Image.Image, path: str | Path) -> np.ndarray:
    """A 16-bit gray image as uint8 ``(H, W)``: ``round(v * 255 / 65535)`` over the full range,
    never clipped (PIL's own ``convert("L")`` saturates every value above 255)."""
    values = np.asarray(img, dtype=np.float64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageReadError(
            f"image {path}: {img.mode} values span [{values.min():.0f}, {values.max():.0f}], outside the "
            "16-bit range 0..65535; convert the file to an 8- or 16-bit PNG"
        )
    return np.rint(values * (255.0 / 65535.0)).astype(np.uint8)


def to_rgb(img: Image.Image, path: str | Path) -> Image.Image:
    """Convert any PIL mode to RGB with the recoveries listed in the module docstring."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in SIXTEEN_BIT_MODES:
        gray = sixteen_bit_to_uint8(img, path)
        report_once("16bit", "image %s is 16-bit (%s): scaled by 255/65535 to 8 bit, gray replicated to RGB", path, mode)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        report_once("alpha", "image %s has an alpha channel (%s): alpha dropped, colour kept", path, mode)
        return img.convert("RGBA").convert("RGB") if mode in ("P", "PA") else img.convert("RGB")
    if mode in ("L", "1"):
        report_once("gray", "image %s is grayscale (%s): channel replicated to RGB", path, mode)
    return img.convert("RGB")


@contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """``Image.open`` whose decoding errors (also those raised while the caller converts the
    image) become an :class:`ImageReadError` naming the file; a missing file stays
    ``FileNotFoundError``."""
    try:
        with Image.open(path) as img:
            yield img
    except FileNotFoundError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise ImageReadError(
            f"cannot decode image {path}: {err}. The file is corrupt or not an image: replace it, "
            "or remove its row from the index CSV"
        ) from err


def load_rgb(path: str | Path, min_side: int | None = None) -> np.ndarray:
    """Decode ``path`` to an RGB uint8 HWC array.

    With ``min_side`` the image is shrunk (aspect kept) so its shorter side is ``min_side``;
    JPEG decoding then uses the decoder's fast DCT scaling (``draft``).
    """
    with open_image(path) as img:
        if min_side is not None:
            scale = min_side / min(img.size)
            if scale < 1:
                target = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
                img.draft("RGB", target)
        img = to_rgb(img, path)
        if min_side is not None and min(img.size) != min_side:
            scale = min_side / min(img.size)
            img = img.resize(
                (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))),
                Image.BILINEAR,
            )
        return np.asarray(img)


def preload_images(
    paths: Sequence[str], image_size: int, workers: int = 4, skip_unreadable: bool = False
) -> list[np.ndarray | None]:
    """Decode every image once, shrunk so the shorter side is ~1.15 x the training size.

    The margin leaves room for random resized crops; at 64 px HAM10000 takes ~200 MB. With
    ``skip_unreadable`` an undecodable file becomes ``None`` (the dataset then skips it and
    counts it when it is fetched) instead of failing the preload.
    """
    min_side = math.ceil(image_size * 1.15)

    def one(path):
        try:
            return load_rgb(path, min_side)
        except ImageReadError:
            if skip_unreadable:
                return None
            raise

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, paths, chunksize=64))


def find_missing(paths: Sequence[str]) -> list[int]:
    """Positions of paths that do not exist (checked before training, not mid-epoch)."""
    return [i for i, p in enumerate(paths) if not Path(p).is_file()]
