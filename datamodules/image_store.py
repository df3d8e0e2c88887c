"""Image stores: what a DataModule decodes ahead of training (nothing, RAM, the disk cache).

A source plugs one store in (``image_store`` class attribute); the store returns, for the
index's ``path`` column, either ``None`` (datasets decode each file when it is fetched) or a
sequence of decoded images aligned with the rows. The datasets take the rows of their split.

* :class:`FileImages` (default): ``data.image_cache_dir`` (memory-mapped cache, cache.py),
  ``data.preload`` (RAM), both, or neither; through the source's ``load_image``.
* :class:`XrayFiles`: ``data.preload`` decodes radiographs to small gray copies (xray_images.py).
* :class:`InMemoryArrays`: the source already holds the pixels (an npz); always in RAM, with
  the channels the backbone wants (``in_chans``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medmetric.datamodules.cache import open_image_cache
from medmetric.datamodules.images import ImageReadError, load_rgb, preload_images
from medmetric.datamodules.xray_images import preload_xrays, to_channels


class FileImages:
    """Image files read through ``dm.load_image``; cached or preloaded when asked to."""

    def decoded(self, dm, paths: list[str]):
        if dm.image_cache_dir:
            self.check_cacheable(dm)
            cached = open_image_cache(paths, dm.image_size, dm.image_cache_dir)
            return [cached[i] for i in range(len(cached))] if dm.preload else cached
        return self.preload(dm, paths) if dm.preload else None

    @staticmethod
    def check_cacheable(dm) -> None:
        if dm.load_image is not load_rgb:
            raise ValueError(
                f"data.image_cache_dir: {type(dm).__name__} reads images through its own loader "
                "(e.g. HDF5 patches), which the image cache does not support; leave image_cache_dir unset"
            )
        if dm.bad_image_policy == "skip":
            raise ValueError(
                "data.image_cache_dir cannot be combined with data.bad_image_policy=skip: the cache is "
                "built from every image. Remove the unreadable files (`medmetric check-data` lists them) "
                "or leave image_cache_dir unset"
            )

    @staticmethod
    def preload(dm, paths: Sequence[str]) -> list[np.ndarray]:
        skip = dm.bad_image_policy == "skip"
        if dm.load_image is load_rgb:
            return preload_images(paths, dm.image_size, skip_unreadable=skip)
        return [_load_or_none(dm.load_image, p) if skip else dm.load_image(p) for p in paths]


def _load_or_none(load, path: str):
    try:
        return load(path)
    except ImageReadError:
        return None  # counted and logged by ImageDataset when fetched


class XrayFiles:
    """Radiograph files: decoded when fetched, or preloaded as gray copies ~1.15 x image_size."""

    def decoded(self, dm, paths: list[str]):
        return preload_xrays(paths, dm.image_size) if dm.preload else None


class InMemoryArrays:
    """Pixels the source holds already (``dm.load_image(ref)``), with ``dm.in_chans`` channels."""

    def decoded(self, dm, paths: list[str]):
        return [to_channels(dm.load_image(p), dm.in_chans) for p in paths]
