"""ChestX-ray14 (Wang et al., CVPR 2017) in its published on-disk format, multi-label.

Layout read (``data_dir``)::

    Data_Entry_2017_v2020.csv or Data_Entry_2017.csv   Image Index, Finding Labels, Patient ID, ...
    train_val_list.txt, test_list.txt                  the official patient-wise split
    images/*.png  and/or  images_*/images/*.png        (NIH box download / Kaggle layout)

``Finding Labels`` is split on ``|``; ``No Finding`` is the all-zero row. The official test list
is the test set; validation is carved from ``train_val_list.txt`` by Patient ID (a patient's
images stay together), so no patient is in two splits. Batches are ``(image [C, H, W] float,
target [14] float32 multi-hot)``.

Generalised zero-shot mode (``unseen_labels``): in train and val the unseen columns are zeroed
and images whose only findings are unseen are removed, so neither training nor model selection
ever sees an unseen label; test keeps every label.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medmetric.datamodules.base import ImageClassificationDataModule, read_csv_checked
from medmetric.datamodules.datasets import MultiLabelImageDataset
from medmetric.datamodules.image_store import XrayFiles
from medmetric.datamodules.split_planner import OfficialTestPatientSplit, patient_split
from medmetric.datamodules.tasks import MultiLabelTask
from medmetric.datamodules.xray_images import to_channels

__all__ = ["ChestXray14DataModule", "MultiLabelImageDataset", "parse_finding_labels", "patient_split"]

log = logging.getLogger(__name__)

CHESTXRAY14_LABELS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip
NO_FINDING = "No Finding"
DEFAULT_UNSEEN = ("Edema", "Pneumonia", "Emphysema", "Fibrosis")  # CXR-ML-GZSL (Hayat et al. 2021)
METADATA_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
TRAIN_VAL_LIST, TEST_LIST = "train_val_list.txt", "test_list.txt"
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")


def parse_finding_labels(findings: pd.Series, path: Path, class_names: Sequence[str] = CHESTXRAY14_LABELS) -> np.ndarray:
    """``"Effusion|Mass"`` -> multi-hot rows (float32, class_names order); ``No Finding`` -> zeros.

    Unknown names, empty cells and ``No Finding`` mixed with a finding fail with the CSV row.
    """
    column = {name: i for i, name in enumerate(class_names)}
    targets = np.zeros((len(findings), len(class_names)), dtype=np.float32)
    for row, text in enumerate(findings.tolist()):
        names = [n.strip() for n in str(text).split("|")] if isinstance(text, str) else [""]
        if names == [NO_FINDING]:
            continue
        bad = [n for n in names if n not in column]
        if bad:
            hint = f"'{NO_FINDING}' cannot be combined with findings" if NO_FINDING in bad else f"valid: {list(class_names)} or '{NO_FINDING}'"
            raise ValueError(
                f"{path}, row {row + 2}, column 'Finding Labels': {text!r} has unknown label(s) {bad} ({hint}). "
                "Fix the row or remove it"
            )
        targets[row, [column[n] for n in names]] = 1.0
    return targets


def read_image_list(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(
            f"official split list not found: {path}. ChestX-ray14 ships {TRAIN_VAL_LIST} and {TEST_LIST} "
            "beside Data_Entry_2017.csv; put them in data.data_dir"
        )
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    duplicated = pd.Series(names).duplicated()
    if duplicated.any():
        raise ValueError(f"{path}, line {int(np.flatnonzero(duplicated)[0]) + 1}: {names[int(np.flatnonzero(duplicated)[0])]!r} listed twice")
    return names


def locate_xrays(data_dir: Path, names: pd.Series) -> pd.Series:
    """Map image file names to paths under ``images/`` or ``images_*/images/`` (first hit wins);
    names not found get the ``images/`` path so the missing-file error can show it."""
    folders = [data_dir / "images"] + sorted(data_dir.glob("images_*/images"))
    found: dict[str, str] = {}
    for folder in folders:
        if folder.is_dir():
            with os.scandir(folder) as entries:
                for entry in entries:
                    found.setdefault(entry.name, entry.path)
    return names.map(lambda n: found.get(n, str(data_dir / "images" / n)))


class ChestXray14DataModule(ImageClassificationDataModule):
    """ChestX-ray14, 14 findings, multi-label; see the module docstring for the layout.

    Args (beyond :class:`ImageClassificationDataModule`'s):
        in_chans: 1 keeps the gray channel, 3 replicates it (ImageNet-style backbones).
        unseen_labels: generalised zero-shot: labels held out of train and val (e.g.
            ``[Edema, Pneumonia, Emphysema, Fibrosis]``); ``None`` = ordinary multi-label.
        metadata_file: the label CSV's name in ``data_dir`` (default: v2020 file, else 2017).
        sampler: ``instance`` only (class-aware samplers are single-label).
    """

    group_key = "patient"
    split_planner = OfficialTestPatientSplit(TEST_LIST, TRAIN_VAL_LIST)
    task = MultiLabelTask()
    image_store = XrayFiles()
    missing_images_fix = ("Extract every images_*.tar.gz archive there (images/ or images_*/images/), "
                          "or remove the rows from the CSV and the lists")

    def __init__(
        self,
        data_dir: str,
        image_size: int = 64,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 42,
        split_file: str | None = None,
        augment: str = "cxr",
        in_chans: int = 3,
        unseen_labels: list[str] | None = None,
        metadata_file: str | None = None,
        sampler: str = "instance",
        preload: bool = False,
        num_workers: int = 2,
        seed: int = 0,
        global_batch_size: int | None = None,
    ):
        if sampler != "instance":
            raise ValueError(
                f"data.sampler={sampler!r}: multi-label ChestX-ray14 supports only 'instance' sampling "
                "(class-aware samplers need one label per image); re-balance with the loss instead"
            )
        super().__init__(
            data_dir, image_size=image_size, batch_size=batch_size, eval_batch_size=eval_batch_size,
            sampler="instance", val_fraction=val_fraction, test_fraction=0.0, split_seed=split_seed,
            split_file=split_file, augment=augment, preload=preload, num_workers=num_workers, seed=seed,
            global_batch_size=global_batch_size,
        )
        to_channels(np.zeros((1, 1), np.uint8), in_chans)  # bad in_chans fails now
        self.in_chans = in_chans
        self.metadata_file = metadata_file
        unseen = list(unseen_labels or [])
        unknown = [n for n in unseen if n not in CHESTXRAY14_LABELS]
        if unknown or len(set(unseen)) != len(unseen) or len(unseen) >= len(CHESTXRAY14_LABELS):
            raise ValueError(
                f"data.unseen_labels={unseen}: unknown {unknown} or repeated names, or no seen label left; "
                f"choose distinct names among {list(CHESTXRAY14_LABELS)} (spelling as in Finding Labels)"
            )
        self.unseen_labels = [n for n in CHESTXRAY14_LABELS if n in unseen]
        self.seen_labels = [n for n in CHESTXRAY14_LABELS if n not in unseen]

    @property
    def class_names(self) -> list[str]:
        return list(CHESTXRAY14_LABELS)

    @property
    def unseen_idx(self) -> list[int]:
        return [self.class_names.index(n) for n in self.unseen_labels]

    @property
    def seen_idx(self) -> list[int]:
        return [self.class_names.index(n) for n in self.seen_labels]

    # --- index ---------------------------------------------------------------------------------
    def metadata_path(self) -> Path:
        if self.metadata_file:
            return self.data_dir / self.metadata_file
        for name in METADATA_NAMES:
            if (self.data_dir / name).is_file():
                return self.data_dir / name
        return self.data_dir / METADATA_NAMES[-1]

    def read_index(self) -> pd.DataFrame:
        """Rows of the official lists: image_id, path, label (Finding Labels), group, official
        (train_val/test), and ``targets`` (multi-hot) as an attribute of the frame."""
        path = self.metadata_path()
        meta = read_csv_checked(path, REQUIRED_COLUMNS, "ChestX-ray14 Data_Entry CSV")
        for column in REQUIRED_COLUMNS:
            empty = meta[column].isna()
            if empty.any():
                row = int(np.flatnonzero(empty.to_numpy())[0])
                raise ValueError(f"{path}, row {row + 2}, column {column!r}: empty value; fill it or drop the row")
        duplicated = meta["Image Index"].duplicated()
        if duplicated.any():
            row = int(np.flatnonzero(duplicated.to_numpy())[0])
            raise ValueError(f"{path}, row {row + 2}: image {meta['Image Index'].iloc[row]!r} is listed twice")
        official = {}
        for name, split in ((TRAIN_VAL_LIST, "train_val"), (TEST_LIST, "test")):
            listed = read_image_list(self.data_dir / name)
            absent = sorted(set(listed) - set(meta["Image Index"]))
            if absent:
                raise ValueError(
                    f"{self.data_dir / name}: {len(absent)} listed images are not in {path.name} (e.g. {absent[:3]}); "
                    "use the list files of the same release as the CSV"
                )
            both = sorted(set(listed) & set(official))
            if both:
                raise ValueError(f"{self.data_dir / name}: {len(both)} images are also in {TRAIN_VAL_LIST} (e.g. {both[:3]})")
            official.update(dict.fromkeys(listed, split))
        in_lists = meta["Image Index"].isin(official)
        if not in_lists.all():
            log.warning("%s: %d images are in neither official list and are not used", path, int((~in_lists).sum()))
        meta = meta[in_lists].reset_index(drop=True)
        table = pd.DataFrame({
            "image_id": meta["Image Index"],
            "path": locate_xrays(self.data_dir, meta["Image Index"]),
            "label": meta["Finding Labels"],
            "group": meta["Patient ID"].str.strip(),
            "official": meta["Image Index"].map(official),
        })
        table.attrs["targets"] = parse_finding_labels(meta["Finding Labels"], path, self.class_names)
        return table
