"""A preprocessed image cache: decode and resize every image once, then read raw uint8 pixels.

Decoding a JPEG/PNG and shrinking it costs more than the rest of a small training step; the
cache pays it once. Each image is stored exactly as :func:`medmetric.datamodules.images.preload_images`
would hold it in RAM (aspect ratio kept, shorter side ``ceil(1.15 x image_size)``, so random
resized crops still have room, which is >= the training crop), one after another in a flat
``<name>.u8`` file that is memory-mapped, plus ``<name>.json`` with each image's offset and
shape. Images of any aspect ratio therefore fit without padding or squashing.

Keying and staleness: the cache file name hashes the source paths (in order) and the stored
shorter side; the index also records every source file's size and mtime. When any of those
changed (a file touched, replaced, resized), the cache is rebuilt in place.

Concurrency: building holds an exclusive ``flock`` on ``<name>.lock``; a second process
(another DDP rank, another sweep agent on the same data) blocks on the lock, then finds the
fresh index and only reads. Data and index are written to temporary files and renamed, the
index last, so a reader never sees a half-written cache and a killed build leaves none.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from medmetric.datamodules.images import load_rgb
from medmetric.run_io.atomic import atomic_write

log = logging.getLogger(__name__)

CACHE_VERSION = 1
PRELOAD_MARGIN = 1.15  # the same margin as medmetric.datamodules.images.preload_images


def stored_min_side(image_size: int) -> int:
    """Shorter side of a cached image for a given training size (>= the crop, with margin)."""
    return math.ceil(image_size * PRELOAD_MARGIN)


def source_fingerprint(paths: Sequence[str]) -> list[list[int]]:
    """(size in bytes, mtime in ns) of every source file: what makes a cache stale."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([st.st_size, st.st_mtime_ns])
    return out


def cache_name(paths: Sequence[str], min_side: int) -> str:
    digest = hashlib.sha256()
    digest.update(f"v{CACHE_VERSION}|{min_side}|".encode())
    for p in paths:
        digest.update(os.path.abspath(p).encode() + b"\0")
    return f"images-{min_side}px-{len(paths)}-{digest.hexdigest()[:16]}"


class CachedImages:
    """Array-like view of a built cache: ``images[i]`` is an HxWx3 uint8 array (a copy).

    Pickles without its memory map (DataLoader workers reopen the file), and ``take(rows)``
    gives the view of a subset (one per split) sharing the same file.
    """

    def __init__(self, data_path: Path, offsets: np.ndarray, shapes: np.ndarray, rows: np.ndarray | None = None):
        self.data_path = Path(data_path)
        self.offsets = offsets
        self.shapes = shapes
        self.rows = np.arange(len(offsets)) if rows is None else np.asarray(rows, dtype=np.int64)
        self._map: np.memmap | None = None
        self.built_here = False  # whether this call built (or rebuilt) the cache

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        if self._map is None:
            self._map = np.memmap(self.data_path, dtype=np.uint8, mode="r")
        j = self.rows[i]
        h, w = self.shapes[j]
        start = self.offsets[j]
        return np.array(self._map[start : start + h * w * 3]).reshape(h, w, 3)

    def take(self, rows: Sequence[int]) -> CachedImages:
        return CachedImages(self.data_path, self.offsets, self.shapes, self.rows[np.asarray(rows, dtype=np.int64)])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None}


def _read_index(index_path: Path, paths: Sequence[str], min_side: int, fingerprint) -> dict | None:
    """The index if it exists and matches the sources exactly, else None (stale or absent)."""
    try:
        index = json.loads(index_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    fresh = (
        index.get("version") == CACHE_VERSION
        and index.get("min_side") == min_side
        and index.get("paths") == [os.path.abspath(p) for p in paths]
        and index.get("fingerprint") == fingerprint
    )
    return index if fresh else None


def _build(data_path: Path, index_path: Path, paths: Sequence[str], min_side: int, fingerprint, workers: int) -> dict:
    from tqdm.auto import tqdm

    offsets: list[int] = []
    shapes: list[tuple[int, int]] = []

    def write_images(out) -> None:
        offset = 0
        with ThreadPoolExecutor(max_workers=workers) as pool:
            decoded = pool.map(lambda p: load_rgb(p, min_side), paths)
            for image in tqdm(decoded, total=len(paths), desc=f"image cache {data_path.stem}", unit="img", mininterval=1.0):
                image = np.ascontiguousarray(image, dtype=np.uint8)
                offsets.append(offset)
                shapes.append(image.shape[:2])
                out.write(image.tobytes())
                offset += image.nbytes

    atomic_write(data_path, write_images, what="image cache")
    total_bytes = sum(h * w * 3 for h, w in shapes)  # uint8 RGB, written back to back
    index = {
        "version": CACHE_VERSION,
        "min_side": min_side,
        "paths": [os.path.abspath(p) for p in paths],
        "fingerprint": fingerprint,
        "offsets": offsets,
        "shapes": [list(map(int, s)) for s in shapes],
        "bytes": total_bytes,
        "builder_pid": os.getpid(),
    }
    text = json.dumps(index).encode()
    atomic_write(index_path, lambda handle: handle.write(text), what="image cache index")  # the commit point
    return index


def open_image_cache(paths: Sequence[str], image_size: int, cache_dir: str | Path, workers: int = 4) -> CachedImages:
    """Open the cache of ``paths`` for ``image_size``, building (or rebuilding) it if needed.

    Safe to call from many processes at once: one builds under the lock, the others wait.
    """
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the image cache folder {cache_dir} ({err}); set data.image_cache_dir to a writable folder") from err
    min_side = stored_min_side(image_size)
    name = cache_name(paths, min_side)
    data_path, index_path = cache_dir / f"{name}.u8", cache_dir / f"{name}.json"
    fingerprint = source_fingerprint(paths)
    with open(cache_dir / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if we crash
        index = _read_index(index_path, paths, min_side, fingerprint)
        built = index is None
        if built:
            log.info("building image cache %s (%d images, shorter side %d px)", data_path, len(paths), min_side)
            index = _build(data_path, index_path, paths, min_side, fingerprint, workers)
        else:
            log.info("reusing image cache %s", data_path)
    images = CachedImages(data_path, np.asarray(index["offsets"], dtype=np.int64), np.asarray(index["shapes"], dtype=np.int64))
    images.built_here = built
    return images
