"""Histopathology patch sets: Kimia Path24 (RGB release and official HDF5), ImageFolder, CSV.

Kimia Path24 (Babaie et al., CVPR-W 2017): 24 whole-slide scans, one class each (``s0``..``s23``);
the official test set is 1,325 patches cut out of those scans. The official train/test split is
kept: validation is carved from the training patches only (``split`` column, see base.py).

Layouts read (what is not known offline is an assumption, stated here):

* **RGB release**: ``<data_dir>/Training/s<k>/*`` (training patches, one folder per scan) and
  the test patches in per-class folders ``<data_dir>/{Test,Testing,test}/s<k>/*``. Patches are
  1000 x 1000 px RGB in the release; any size is accepted (they are resized to ``image_size``).
* **HDF5** (``<data_dir>`` is a ``.h5``/``.hdf5`` file, or a folder holding exactly one):
  ``/scan<k>/data`` the whole scan ``k`` as (H, W, 3) uint8 (or (H, W) grey),
  ``/test_data/patches`` (N, h, w, 3) uint8 and ``/test_data/targets`` (N,) integer scan ids
  0..23 (0-based, as the scan group names; an id outside 0..23 is reported, not guessed).
  Nothing is decoded up front: each sample is an h5py slice read when the loader asks for it.
  Training patches are cut from the scans on a grid of ``patch_size`` px squares every
  ``stride`` px (defaults 1000 and 1000, the release's patch size, no overlap); a square whose
  near-white (all channels > 220) fraction exceeds ``max_background`` is skipped, which also
  drops the regions the test patches were cut from (whitened in the release).

Groups: every Kimia class is a single scan, so a split by scan is impossible. RGB training
patches are their own groups (``group_key = "patch group"``); patches cut from an HDF5 scan are
grouped by ``group_block`` x ``group_block`` blocks of the grid, so overlapping neighbours
(``stride < patch_size``) stay in one split except along block borders.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from medmetric.datamodules.base import ImageClassificationDataModule, read_csv_checked
from medmetric.datamodules.images import load_rgb

KIMIA_CLASSES = tuple(f"s{k}" for k in range(24))
PATCH_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
KIMIA_TEST_DIRS = ("Test", "Testing", "test", "testing")
H5_SUFFIXES = (".h5", ".hdf5")
H5_SEP = "::"  # "<file.h5>::<dataset>[<i>]" or "<file.h5>::<dataset>@<y>,<x>,<size>"
BACKGROUND_LEVEL = 220

_h5_handles: dict[tuple[int, str], object] = {}


def _h5_file(path: str):
    """An open read-only h5py file, one per process (DataLoader workers open their own)."""
    import h5py

    key = (os.getpid(), path)
    if key not in _h5_handles:
        _h5_handles[key] = h5py.File(path, "r")
    return _h5_handles[key]


def _as_rgb(array: np.ndarray, where: str) -> np.ndarray:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"{where}: expected an (H, W, 3) RGB array, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"{where}: expected uint8 pixels, got {array.dtype}; convert the file to uint8")
    return np.ascontiguousarray(array[..., :3])


def load_patch(path: str) -> np.ndarray:
    """RGB uint8 patch from an image file or from an HDF5 reference (read lazily, one slice)."""
    if H5_SEP not in path:
        return load_rgb(path)
    file, ref = path.split(H5_SEP, 1)
    if "@" in ref:
        name, coords = ref.split("@")
        y, x, size = (int(v) for v in coords.split(","))
        return _as_rgb(_h5_file(file)[name][y : y + size, x : x + size], path)
    name, index = re.fullmatch(r"(.+)\[(\d+)\]", ref).groups()
    return _as_rgb(_h5_file(file)[name][int(index)], path)


def find_missing_patches(paths: Sequence[str]) -> list[int]:
    """Missing image files; HDF5 references count as present when their file exists."""
    return [i for i, p in enumerate(paths) if not Path(p.split(H5_SEP, 1)[0]).is_file()]


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PATCH_SUFFIXES)


def class_folder_index(root: Path) -> pd.DataFrame:
    """ImageFolder layout ``root/<class>/<image>``: columns image_id (class/name), path, label."""
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for image in list_images(folder):
            rows.append((f"{folder.name}/{image.name}", str(image), folder.name))
    return pd.DataFrame(rows, columns=["image_id", "path", "label"])


def _kimia_class(name: str, where) -> str:
    if name not in KIMIA_CLASSES:
        raise ValueError(f"{where}: {name!r} is not a Kimia Path24 class folder (expected s0..s23)")
    return name


def read_kimia_rgb(root: Path) -> pd.DataFrame:
    """Index of the RGB release: Training/s<k>/* (train) and Test*/s<k>/* (test)."""
    train_dir = root / "Training"
    test_dirs = [root / d for d in KIMIA_TEST_DIRS if (root / d).is_dir()]
    if not train_dir.is_dir() or not test_dirs:
        raise FileNotFoundError(
            f"{root}: expected Kimia Path24 folders Training/s0..s23 and one of "
            f"{list(KIMIA_TEST_DIRS)}/s0..s23 (or an HDF5 file). Check data.data_dir"
        )
    parts = []
    for split, folder in (("train", train_dir), ("test", test_dirs[0])):
        table = class_folder_index(folder)
        for label in table["label"].unique():
            _kimia_class(label, folder / label)
        table["image_id"] = split + "/" + table["image_id"]
        table["split"] = split
        parts.append(table)
    table = pd.concat(parts, ignore_index=True)
    table["group"] = table["image_id"]
    return table


def scan_grid(height: int, width: int, patch_size: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of every whole ``patch_size`` square on a ``stride`` grid."""
    ys = range(0, height - patch_size + 1, stride)
    xs = range(0, width - patch_size + 1, stride)
    return [(y, x) for y in ys for x in xs]


def background_fraction(patch: np.ndarray) -> float:
    """Share of near-white pixels (all channels above BACKGROUND_LEVEL): glass, not tissue."""
    rgb = _as_rgb(patch, "patch")
    return float((rgb > BACKGROUND_LEVEL).all(axis=2).mean())


def read_kimia_hdf5(
    file: Path, patch_size: int, stride: int, max_background: float, group_block: int
) -> pd.DataFrame:
    """Index of the official HDF5: training patches cut from /scan<k>/data, test from /test_data."""
    import h5py

    rows = []
    try:
        h5 = h5py.File(file, "r")
    except OSError as err:
        raise ValueError(f"{file}: cannot open the HDF5 file ({err}); it is damaged or not HDF5: copy or convert it again") from err
    with h5:
        scans = sorted((k for k in h5 if re.fullmatch(r"scan\d+", k)), key=lambda k: int(k[4:]))
        if not scans or "test_data" not in h5:
            raise ValueError(
                f"{file}: expected groups /scan<k>/data and /test_data/{{patches,targets}} "
                f"(Kimia Path24 HDF5), found {sorted(h5)[:10]}"
            )
        for scan in scans:
            label = _kimia_class(f"s{int(scan[4:])}", f"{file}:/{scan}")
            data = h5[scan]["data"]
            step = max(1, patch_size // 64)  # background judged on a subsampled read
            for y, x in scan_grid(data.shape[0], data.shape[1], patch_size, stride):
                if background_fraction(data[y : y + patch_size : step, x : x + patch_size : step]) > max_background:
                    continue
                block = f"{label}/b{y // (group_block * stride)}_{x // (group_block * stride)}"
                ref = f"{file}{H5_SEP}{scan}/data@{y},{x},{patch_size}"
                rows.append((f"train/{label}/y{y}_x{x}", ref, label, block, "train"))
        targets = np.asarray(h5["test_data"]["targets"][()]).reshape(-1)
        n_patches = h5["test_data"]["patches"].shape[0]
        if len(targets) != n_patches:
            raise ValueError(f"{file}: /test_data/targets has {len(targets)} entries for {n_patches} patches")
        for i, target in enumerate(targets):
            label = _kimia_class(f"s{int(target)}", f"{file}:/test_data/targets[{i}]")
            ref = f"{file}{H5_SEP}test_data/patches[{i}]"
            rows.append((f"test/{i:05d}", ref, label, f"test/{i:05d}", "test"))
    if not any(r[4] == "train" for r in rows):
        raise ValueError(
            f"{file}: no training patch of {patch_size} px fits the scans with at most "
            f"{max_background:.0%} background; lower data.patch_size or raise data.max_background"
        )
    return pd.DataFrame(rows, columns=["image_id", "path", "label", "group", "split"])


def find_hdf5(data_dir: Path) -> Path | None:
    if data_dir.is_file() and data_dir.suffix.lower() in H5_SUFFIXES:
        return data_dir
    if data_dir.is_dir():
        found = sorted(p for p in data_dir.iterdir() if p.suffix.lower() in H5_SUFFIXES)
        if len(found) > 1:
            raise ValueError(f"{data_dir} holds several HDF5 files {[p.name for p in found]}; point data.data_dir at one")
        return found[0] if found else None
    return None


class HistopathologyDataModule(ImageClassificationDataModule):
    """Shared by the patch sources: lazy HDF5-aware loading, histopathology augmentation."""

    load_image = staticmethod(load_patch)

    def __init__(self, data_dir: str, augment: str = "histopathology", **kwargs):
        super().__init__(data_dir, augment=augment, **kwargs)

    def find_missing_images(self, paths: Sequence[str]) -> list[int]:
        return find_missing_patches(paths)


class KimiaPath24DataModule(HistopathologyDataModule):
    """Kimia Path24, RGB folders or the official HDF5; the official test set is kept.

    Args:
        patch_size, stride: the grid on which training patches are cut from HDF5 scans (px).
        max_background: skip a grid square with more near-white pixels than this fraction.
        group_block: grid squares per side of one split group (HDF5 scans).
        Other arguments: :class:`ImageClassificationDataModule` (``test_fraction`` is unused).
    """

    group_key = "patch group"

    def __init__(
        self,
        data_dir: str,
        patch_size: int = 1000,
        stride: int | None = None,
        max_background: float = 0.5,
        group_block: int = 3,
        **kwargs,
    ):
        if patch_size < 1 or (stride is not None and stride < 1):
            raise ValueError(f"data.patch_size and data.stride must be >= 1, got {patch_size}, {stride}")
        self.patch_size = patch_size
        self.stride = stride or patch_size
        self.max_background = max_background
        self.group_block = group_block
        super().__init__(data_dir, **kwargs)

    @property
    def class_names(self) -> list[str]:
        return list(KIMIA_CLASSES)

    @cached_property
    def _index(self) -> pd.DataFrame:
        """Built once per process: cutting HDF5 scans reads every grid square (subsampled)."""
        h5 = find_hdf5(self.data_dir)
        if h5 is not None:
            return read_kimia_hdf5(h5, self.patch_size, self.stride, self.max_background, self.group_block)
        return read_kimia_rgb(self.data_dir)

    def read_index(self) -> pd.DataFrame:
        return self._index.copy()


class PatchFolderDataModule(HistopathologyDataModule):
    """Any ``<data_dir>/<class>/<patch>`` set (ImageFolder layout).

    With ``<data_dir>/train/<class>/`` and ``<data_dir>/test/<class>/`` the given test set is
    kept (validation carved from train). ``group_pattern`` is a regex whose first group takes the
    slide/patient id from the file name (e.g. ``'^(TCGA-\\w\\w-\\w{4})'``), so one slide's
    patches stay in one split; without it every patch is its own group.
    """

    group_key = "slide"

    def __init__(self, data_dir: str, group_pattern: str | None = None, **kwargs):
        self.group_pattern = re.compile(group_pattern) if group_pattern else None
        super().__init__(data_dir, **kwargs)

    @cached_property
    def _index(self) -> pd.DataFrame:
        root = self.data_dir
        if not root.is_dir():
            raise FileNotFoundError(f"patch folder not found: {root}. Check data.data_dir")
        if (root / "train").is_dir() and (root / "test").is_dir():
            parts = []
            for split in ("train", "test"):
                part = class_folder_index(root / split)
                part["image_id"] = split + "/" + part["image_id"]
                part["split"] = split
                parts.append(part)
            table = pd.concat(parts, ignore_index=True)
        else:
            table = class_folder_index(root)
        if table.empty:
            raise ValueError(f"no patches ({', '.join(PATCH_SUFFIXES)}) in class folders under {root}")
        table["group"] = [self._group(i, p) for i, p in zip(table["image_id"], table["path"], strict=True)]
        return table

    def _group(self, image_id: str, path: str) -> str:
        if self.group_pattern is None:
            return image_id
        match = self.group_pattern.search(Path(path).name)
        if match is None or not match.groups():
            raise ValueError(
                f"{path}: data.group_pattern {self.group_pattern.pattern!r} does not match the file "
                "name (or has no capture group); fix the pattern or drop it"
            )
        return match.group(1)

    @property
    def class_names(self) -> list[str]:
        return sorted(self._index["label"].unique())

    def read_index(self) -> pd.DataFrame:
        return self._index.copy()


class PatchCSVDataModule(HistopathologyDataModule):
    """A CSV index of patches: ``path,label`` plus optional slide/patient id and split.

    Relative paths are relative to the CSV's folder. The group column (``group_column``, or the
    first of slide_id, slide, patient_id, patient found) keeps a slide's patches in one split; an
    optional ``split`` column with train/test fixes the test set.
    """

    group_key = "slide"
    GROUP_COLUMNS = ("slide_id", "slide", "patient_id", "patient")

    def __init__(self, data_dir: str, csv_file: str = "patches.csv", group_column: str | None = None, **kwargs):
        self.csv_file = csv_file
        self.group_column = group_column
        super().__init__(data_dir, **kwargs)

    @cached_property
    def _index(self) -> pd.DataFrame:
        path = self.data_dir / self.csv_file
        table = read_csv_checked(path, ("path", "label"), "patch CSV")
        for column in ("path", "label"):
            empty = table[column].isna()
            if empty.any():
                row = int(np.flatnonzero(empty.to_numpy())[0])
                raise ValueError(f"{path}, row {row + 2}, column {column!r}: empty value; fill it or drop the row")
        group_column = self.group_column or next((c for c in self.GROUP_COLUMNS if c in table.columns), None)
        if group_column is not None and group_column not in table.columns:
            raise ValueError(f"{path}: no column {group_column!r} (data.group_column); found {list(table.columns)}")
        folder = path.parent
        out = pd.DataFrame({
            "image_id": table["path"],
            "path": [str(p if Path(p).is_absolute() else folder / p) for p in table["path"]],
            "label": table["label"],
        })
        out["group"] = table[group_column].fillna(table["path"]) if group_column else table["path"]
        if "split" in table.columns:
            bad = ~table["split"].isin(["train", "test"])
            if bad.any():
                row = int(np.flatnonzero(bad.to_numpy())[0])
                raise ValueError(f"{path}, row {row + 2}, column 'split': {table['split'].iloc[row]!r}; use train or test")
            out["split"] = table["split"]
        duplicated = out["image_id"].duplicated()
        if duplicated.any():
            row = int(np.flatnonzero(duplicated.to_numpy())[0])
            raise ValueError(f"{path}, row {row + 2}: path {out['image_id'].iloc[row]!r} is listed twice")
        return out

    @property
    def class_names(self) -> list[str]:
        return sorted(self._index["label"].unique())

    def read_index(self) -> pd.DataFrame:
        return self._index.copy()
