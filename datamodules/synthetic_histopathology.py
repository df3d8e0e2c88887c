"""Tiny generated histopathology sets in the real on-disk layouts (tests, demo fallback).

Each class is an H&E-like texture: pink stroma (eosin) with purple nuclei (haematoxylin) whose
size, density, elongation and hue depend on the class, so a small CNN can tell them apart.

* :func:`write_kimia_rgb`: ``Training/s<k>/*.png`` and ``Testing/s<k>/*.png`` (the RGB release);
* :func:`write_kimia_hdf5`: one file with ``/scan<k>/data`` whole scans and
  ``/test_data/{patches,targets}``; test patches are cut from the scans and their regions
  whitened, as in the release;
* :func:`write_patch_folders`: ``<root>/<class>/*.png`` for any class names (open-set tests).

Writers refuse to overwrite existing files.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

KIMIA_CLASSES = tuple(f"s{k}" for k in range(24))
_STROMA = np.array([236, 176, 200], dtype=np.float32)
_NUCLEUS = np.array([92, 52, 140], dtype=np.float32)


def _style(cls: int, n_classes: int) -> dict:
    """Texture parameters of one class (deterministic in the class index)."""
    rng = np.random.default_rng(1000 + cls)
    return {
        "radius": 1.2 + 3.0 * ((cls * 7) % n_classes) / max(n_classes - 1, 1),
        "density": 0.004 + 0.02 * ((cls * 5) % n_classes) / max(n_classes - 1, 1),
        "aspect": 1.0 + 1.5 * ((cls * 3) % 4) / 3,
        "angle": math.pi * ((cls * 11) % 6) / 6,
        "tint": rng.uniform(-40, 40, size=3).astype(np.float32),
    }


def render_tissue(cls: int, n_classes: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """An (height, width, 3) uint8 H&E-like texture of class ``cls``."""
    style = _style(cls, n_classes)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.broadcast_to(_STROMA + 0.5 * style["tint"], (height, width, 3)).copy()
    image += rng.normal(0, 8, (height, width, 3))
    count = max(1, rng.poisson(style["density"] * height * width))
    ca, sa = math.cos(style["angle"]), math.sin(style["angle"])
    mask = np.zeros((height, width), dtype=np.float32)
    for cy, cx in zip(rng.uniform(0, height, count), rng.uniform(0, width, count), strict=True):
        r = style["radius"] * rng.uniform(0.8, 1.2)
        y0, y1 = int(max(cy - 4 * r * style["aspect"], 0)), int(min(cy + 4 * r * style["aspect"] + 1, height))
        x0, x1 = int(max(cx - 4 * r * style["aspect"], 0)), int(min(cx + 4 * r * style["aspect"] + 1, width))
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        u, v = dx * ca + dy * sa, (dy * ca - dx * sa) * style["aspect"]
        mask[y0:y1, x0:x1] = np.maximum(mask[y0:y1, x0:x1], np.clip(r + 0.5 - np.sqrt(u * u + v * v), 0, 1))
    nucleus = _NUCLEUS + 0.3 * style["tint"]
    image = image * (1 - mask[..., None]) + nucleus * mask[..., None]
    return np.clip(image, 0, 255).astype(np.uint8)


def _refuse_existing(path: Path) -> None:
    if path.exists():
        raise FileExistsError(errno.EEXIST, "refusing to overwrite existing file or folder", str(path))


def _save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path, "PNG")


def write_patch_folders(
    root, class_names: Sequence[str], per_class: int = 8, patch_size: int = 32, seed: int = 0,
    style_offset: int = 0, n_styles: int | None = None,
) -> Path:
    """``root/<class>/<class>_<i>.png``; class ``j`` gets texture ``style_offset + j`` out of
    ``n_styles`` (default: the number of classes). Returns root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    n_styles = n_styles or (style_offset + len(class_names))
    for j, name in enumerate(class_names):
        folder = root / name
        _refuse_existing(folder)
        for i in range(per_class):
            _save_png(folder / f"{name}_{i:04d}.png", render_tissue(style_offset + j, n_styles, patch_size, patch_size, rng))
    return root


def write_kimia_rgb(
    root, n_train: int = 8, n_test: int = 3, patch_size: int = 32, seed: int = 0
) -> Path:
    """The RGB release layout, 24 classes: ``Training/s<k>/`` and ``Testing/s<k>/``. Returns root."""
    root = Path(root)
    for sub in ("Training", "Testing"):
        _refuse_existing(root / sub)
    write_patch_folders(root / "Training", KIMIA_CLASSES, n_train, patch_size, seed)
    write_patch_folders(root / "Testing", KIMIA_CLASSES, n_test, patch_size, seed + 1)
    return root


def write_kimia_hdf5(
    path, scan_patches: tuple[int, int] = (4, 4), n_test: int = 2, patch_size: int = 32, seed: int = 0,
    n_classes: int = 24,
) -> Path:
    """The official HDF5 layout: scans of ``scan_patches`` (rows, cols) grid squares each.

    The first ``n_test`` grid squares of each scan become test patches and are whitened in
    the scan, so :class:`~medmetric.datamodules.histopathology.KimiaPath24DataModule` (with the same
    ``patch_size``) finds ``rows * cols - n_test`` training patches per scan. Returns path.
    """
    import h5py

    path = Path(path)
    _refuse_existing(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, cols = scan_patches
    if n_test >= rows * cols:
        raise ValueError(f"n_test={n_test} leaves no training patch in a {rows}x{cols} scan")
    patches, targets = [], []
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as h5:
        for k in range(n_classes):
            scan = render_tissue(k, n_classes, rows * patch_size, cols * patch_size, rng)
            for i in range(n_test):
                y, x = (i // cols) * patch_size, (i % cols) * patch_size
                patches.append(scan[y : y + patch_size, x : x + patch_size].copy())
                targets.append(k)
                scan[y : y + patch_size, x : x + patch_size] = 255
            h5.create_dataset(f"scan{k}/data", data=scan, chunks=(patch_size, patch_size, 3))
        h5.create_dataset("test_data/patches", data=np.stack(patches))
        h5.create_dataset("test_data/targets", data=np.asarray(targets, dtype=np.int64))
    tmp.replace(path)
    return path
