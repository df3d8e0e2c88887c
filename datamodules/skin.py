"""Dermoscopy data sets in their published on-disk formats: HAM10000 and ISIC 2019.

Both are split by lesion: several images of one lesion must stay in one split.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medmetric.datamodules.base import ImageClassificationDataModule, read_csv_checked

HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
ISIC2019_UNKNOWN = "UNK"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def locate_images(data_dir: Path, subdirs: Sequence[str], ids: pd.Series) -> pd.Series:
    """Map image ids to files found in ``subdirs`` (first hit wins).

    Ids not found get the path where the first folder would hold them, so the missing-file
    check can name the expected location.
    """
    found: dict[str, str] = {}
    for sub in subdirs:
        folder = data_dir / sub
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                stem, suffix = os.path.splitext(entry.name)
                if suffix.lower() in IMAGE_SUFFIXES:
                    found.setdefault(stem, entry.path)
    default = data_dir / subdirs[0]
    return ids.map(lambda i: found.get(i, str(default / f"{i}.jpg")))


def check_unique_ids(table: pd.DataFrame, column: str, path: Path) -> None:
    duplicated = table[column].duplicated(keep="first")
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise ValueError(
            f"{path}, row {row + 2}: duplicate {column} {table[column].iloc[row]!r} "
            f"({int(duplicated.sum())} duplicates); each image must be listed once"
        )


class HAM10000DataModule(ImageClassificationDataModule):
    """HAM10000 (Tschandl et al. 2018): ``HAM10000_metadata.csv`` + ``images/<image_id>.jpg``.

    The original release's ``HAM10000_images_part_1/`` and ``_part_2/`` folders work too.
    Grouped by ``lesion_id``.
    """

    group_key = "lesion"
    metadata_name = "HAM10000_metadata.csv"
    image_dirs = ("images", "HAM10000_images_part_1", "HAM10000_images_part_2", ".")

    @property
    def class_names(self) -> list[str]:
        return list(HAM10000_CLASSES)

    def read_index(self) -> pd.DataFrame:
        path = self.data_dir / self.metadata_name
        meta = read_csv_checked(path, ("lesion_id", "image_id", "dx"), "HAM10000 metadata CSV")
        for column in ("image_id", "dx", "lesion_id"):
            empty = meta[column].isna()
            if empty.any():
                row = int(np.flatnonzero(empty.to_numpy())[0])
                raise ValueError(f"{path}, row {row + 2}, column {column!r}: empty value; fill it or drop the row")
        unknown = ~meta["dx"].isin(HAM10000_CLASSES)
        if unknown.any():
            row = int(np.flatnonzero(unknown.to_numpy())[0])
            raise ValueError(
                f"{path}, row {row + 2}, column 'dx': unknown class {meta['dx'].iloc[row]!r} "
                f"({int(unknown.sum())} such rows); valid classes: {list(HAM10000_CLASSES)}"
            )
        check_unique_ids(meta, "image_id", path)
        return pd.DataFrame(
            {
                "image_id": meta["image_id"],
                "path": locate_images(self.data_dir, self.image_dirs, meta["image_id"]),
                "label": meta["dx"],
                "group": meta["lesion_id"],
            }
        )


class ISIC2019DataModule(ImageClassificationDataModule):
    """ISIC 2019 training set: one-hot ground truth CSV + ``ISIC_2019_Training_Input/``.

    ``UNK`` (all zero in the training release) is dropped unless some row uses it. Images are
    grouped by ``lesion_id`` from ``ISIC_2019_Training_Metadata.csv`` when present; images
    without a lesion id form their own group.
    """

    group_key = "lesion"
    ground_truth_name = "ISIC_2019_Training_GroundTruth.csv"
    metadata_name = "ISIC_2019_Training_Metadata.csv"
    image_dirs = ("ISIC_2019_Training_Input", "images", ".")

    @property
    def class_names(self) -> list[str]:
        if not hasattr(self, "_class_names"):
            header = read_csv_checked(self.data_dir / self.ground_truth_name, ("image",), "ISIC 2019 ground truth CSV")
            self._check_label_columns(header.columns)
            uses_unknown = ISIC2019_UNKNOWN in header and (header[ISIC2019_UNKNOWN].astype(float) > 0).any()
            self._class_names = list(ISIC2019_CLASSES) + ([ISIC2019_UNKNOWN] if uses_unknown else [])
        return self._class_names

    def _check_label_columns(self, columns: Sequence[str]) -> None:
        labels = [c for c in columns if c != "image"]
        expected = set(ISIC2019_CLASSES) | {ISIC2019_UNKNOWN}
        missing = [c for c in ISIC2019_CLASSES if c not in labels]
        unknown = [c for c in labels if c not in expected]
        if missing or unknown:
            raise ValueError(
                f"{self.data_dir / self.ground_truth_name}: label columns missing {missing} and unknown "
                f"{unknown}; expected image,{','.join(ISIC2019_CLASSES)}[,{ISIC2019_UNKNOWN}]"
            )

    def read_index(self) -> pd.DataFrame:
        path = self.data_dir / self.ground_truth_name
        truth = read_csv_checked(path, ("image", *ISIC2019_CLASSES), "ISIC 2019 ground truth CSV")
        classes = self.class_names
        onehot = truth[classes].apply(pd.to_numeric, errors="coerce")
        bad = onehot.isna().any(axis=1) | (onehot.sum(axis=1) != 1) | ~onehot.isin([0, 1]).all(axis=1)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(
                f"{path}, row {row + 2} (image {truth['image'].iloc[row]!r}): label columns must hold "
                f"exactly one 1 and otherwise 0 (got {onehot.iloc[row].to_dict()}); {int(bad.sum())} rows "
                "are not single-label. Fix the rows; multi-label data needs a multi-label DataModule"
            )
        check_unique_ids(truth, "image", path)
        labels = np.asarray(classes)[onehot.to_numpy().argmax(axis=1)]
        groups = truth["image"]
        meta_path = self.data_dir / self.metadata_name
        if meta_path.is_file():
            meta = read_csv_checked(meta_path, ("image", "lesion_id"), "ISIC 2019 metadata CSV")
            check_unique_ids(meta, "image", meta_path)
            lesion = truth["image"].map(meta.set_index("image")["lesion_id"])
            groups = lesion.fillna(truth["image"])
        return pd.DataFrame(
            {
                "image_id": truth["image"],
                "path": locate_images(self.data_dir, self.image_dirs, truth["image"]),
                "label": labels,
                "group": groups,
            }
        )
