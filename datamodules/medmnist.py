"""MedMNIST v2 2-D data sets (Yang et al., Sci. Data 2023) from their ``.npz`` files.

An npz holds ``train_images``, ``train_labels`` and the same for ``val_`` and ``test_``; the
official splits are kept as they are. Labels of shape ``(N, 1)`` are single-label (binary or
multi-class: pneumoniamnist, dermamnist, ...) and work with the single-label pipeline
(MetricPretrainModule, RebalancedHeadModule, m-per-class and class-balanced samplers); labels
of shape ``(N, K > 1)`` with 0/1 entries are multi-label (chestmnist) and give multi-hot float
targets for the multi-label modules. Images (28 px, or 64/128/224 in MedMNIST+) stay in memory
and are resized to ``image_size`` by the transform; gray images keep one channel
(``in_chans=1``) or are replicated to three.
"""

from __future__ import annotations

import logging
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medmetric.datamodules.base import ImageClassificationDataModule
from medmetric.datamodules.chest_xray import CHESTXRAY14_LABELS
from medmetric.datamodules.image_store import InMemoryArrays
from medmetric.datamodules.split_planner import OfficialSplit
from medmetric.datamodules.splits import SPLITS
from medmetric.datamodules.tasks import MultiLabelTask, SingleLabelTask
from medmetric.datamodules.xray_images import to_channels

log = logging.getLogger(__name__)
NPZ_SEP = "::"  # check-data's reference to one image: "<npz>::<split>_images[<i>]"

# Label names of the standard sets (MedMNIST v2 INFO), others get class_0, class_1, ...
MEDMNIST_CLASS_NAMES: dict[str, list[str]] = {
    "pneumoniamnist": ["normal", "pneumonia"],
    "breastmnist": ["malignant", "normal_or_benign"],
    "dermamnist": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
    "chestmnist": list(CHESTXRAY14_LABELS),  # same 14 findings, same order as ChestX-ray14
}


def resolve_npz(npz_path: str | None, data_dir: str | None) -> Path:
    """The npz to read: ``npz_path``, or ``data_dir`` itself if it is an npz, or the single npz
    in ``data_dir``."""
    if npz_path:
        path = Path(npz_path)
    elif data_dir and Path(data_dir).suffix == ".npz":
        path = Path(data_dir)
    elif data_dir and Path(data_dir).is_dir():
        found = sorted(Path(data_dir).glob("*.npz"))
        if len(found) != 1:
            raise FileNotFoundError(
                f"{data_dir} holds {len(found)} .npz files ({[f.name for f in found]}); pass the one to use "
                "with data.npz_path"
            )
        path = found[0]
    else:
        raise FileNotFoundError(f"MedMNIST data not found: data.data_dir={data_dir!r}, data.npz_path={npz_path!r}")
    if not path.is_file():
        raise FileNotFoundError(f"MedMNIST npz not found: {path} (data.npz_path / data.data_dir)")
    return path


class MedMNISTFormatError(ValueError):
    """The npz cannot be read or does not hold MedMNIST's arrays."""


def read_medmnist(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (images uint8 (N, H, W[, 3]), labels int64 (N, K))}`` with checked shapes."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in npz.files]
            if missing:
                raise MedMNISTFormatError(
                    f"{path}: missing arrays {missing} (found {npz.files}); expected MedMNIST's train_/val_/test_ images and labels"
                )
            data = {s: (npz[f"{s}_images"], npz[f"{s}_labels"]) for s in SPLITS}
    except MedMNISTFormatError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # truncated / not an npz
        raise MedMNISTFormatError(
            f"{path}: cannot read the npz ({type(err).__name__}: {err}); the file is damaged or not a "
            "MedMNIST .npz: download it again (e.g. pip medmnist's <flag>.npz)"
        ) from err
    for split, (images, labels) in data.items():
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
            raise ValueError(f"{path}: {split}_images must be uint8 (N, H, W) or (N, H, W, 3), got {images.dtype} {images.shape}")
        labels = labels.reshape(len(labels), -1) if labels.ndim == 1 else labels
        if labels.ndim != 2 or len(labels) != len(images):
            raise ValueError(f"{path}: {split}_labels shape {labels.shape} does not match {split}_images {images.shape}")
        if (labels < 0).any():
            row = int(np.argwhere(labels < 0)[0][0])
            raise ValueError(f"{path}: {split}_labels row {row} holds a negative label {labels[row].tolist()}")
        data[split] = (images, labels.astype(np.int64))
    widths = {labels.shape[1] for _, labels in data.values()}
    if len(widths) != 1:
        raise ValueError(f"{path}: label widths differ between splits: {sorted(widths)}")
    return data


class MedMNISTDataModule(ImageClassificationDataModule):
    """Any 2-D MedMNIST npz, official splits; single-label or multi-label from the labels' shape.

    Args (beyond :class:`ImageClassificationDataModule`'s):
        data_dir: a folder with one ``<flag>.npz`` (e.g. ../shared/data/pneumoniamnist), or the npz.
        npz_path: the npz itself (wins over ``data_dir``).
        in_chans: 1 keeps gray images single-channel, 3 replicates them (RGB sets need 3).
        class_names: override the label names (default: the table above, else ``class_<i>``).
    """

    group_key = "image"  # MedMNIST has no patient ids; the official split is used as is
    split_planner = OfficialSplit()
    image_store = InMemoryArrays()  # the npz arrays, in RAM with in_chans channels

    def __init__(
        self,
        data_dir: str | None = None,
        npz_path: str | None = None,
        image_size: int = 28,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        sampler: str = "instance",
        m_per_class: int = 4,
        split_file: str | None = None,
        augment: str = "none",
        in_chans: int = 3,
        class_names: list[str] | None = None,
        num_workers: int = 0,
        seed: int = 0,
        global_batch_size: int | None = None,
    ):
        self.npz_path = resolve_npz(npz_path, data_dir)
        super().__init__(
            str(self.npz_path.parent), image_size=image_size, batch_size=batch_size, eval_batch_size=eval_batch_size,
            sampler=sampler, m_per_class=m_per_class, split_file=split_file, augment=augment, num_workers=num_workers, seed=seed,
            global_batch_size=global_batch_size,
        )
        to_channels(np.zeros((1, 1), np.uint8), in_chans)
        self.in_chans = in_chans
        self.flag = re.sub(r"_\d+$", "", self.npz_path.stem)  # pneumoniamnist_64 -> pneumoniamnist
        self.arrays = read_medmnist(self.npz_path)
        width = next(iter(self.arrays.values()))[1].shape[1]
        self.multilabel = width > 1
        if self.multilabel:
            if sampler != "instance":
                raise ValueError(f"data.sampler={sampler!r}: {self.npz_path.name} is multi-label; use 'instance'")
            bad = [s for s, (_, y) in self.arrays.items() if (y > 1).any()]
            if bad:
                raise ValueError(f"{self.npz_path}: multi-label {bad[0]}_labels must hold only 0/1")
            count = width
        else:
            count = int(max(y.max() for _, y in self.arrays.values())) + 1
        names = class_names or MEDMNIST_CLASS_NAMES.get(self.flag) or [f"class_{i}" for i in range(count)]
        if len(names) != count:
            raise ValueError(f"{self.npz_path}: {count} classes in the labels but {len(names)} names {names} (data.class_names)")
        self._class_names = list(names)
        self.task = MultiLabelTask() if self.multilabel else SingleLabelTask()
        self.official_split_name = self.npz_path.name
        self.unseen_labels: list[str] = []  # multi-label modules read this (no GZSL here)

    @property
    def class_names(self) -> list[str]:
        return self._class_names

    @property
    def seen_labels(self) -> list[str]:
        return list(self._class_names)

    def read_index(self) -> pd.DataFrame:
        """The official table: ``path`` is ``<npz>::<split>_images[<i>]`` (read by :meth:`load_image`),
        ``split`` the npz's own; multi-label targets in ``attrs['targets']``."""
        rows = []
        for split, (_, labels) in self.arrays.items():
            ids = [f"{split}_{i:06d}" for i in range(len(labels))]
            text = ["|".join(self._class_names[j] for j in np.flatnonzero(y)) if self.multilabel else self._class_names[y[0]] for y in labels]
            paths = [f"{self.npz_path}{NPZ_SEP}{split}_images[{i}]" for i in range(len(labels))]
            rows.append(pd.DataFrame({"image_id": ids, "path": paths, "label": text, "group": ids, "split": split}))
        table = pd.concat(rows, ignore_index=True)
        if self.multilabel:
            table.attrs["targets"] = np.concatenate([y for _, y in self.arrays.values()]).astype(np.float32)
        return table

    def find_missing_images(self, paths: Sequence[str]) -> list[int]:
        """Every row is an image of the npz, which was read at construction."""
        return []

    def load_image(self, ref: str) -> np.ndarray:
        """The pixels of ``<npz>::<split>_images[<i>]`` (as stored: (H, W) gray or (H, W, 3))."""
        match = re.fullmatch(r"(.*)::(train|val|test)_images\[(\d+)\]", ref)
        if match is None or Path(match.group(1)) != self.npz_path:
            raise ValueError(f"{ref!r} is not an image of {self.npz_path} (<npz>::<split>_images[<i>])")
        return self.arrays[match.group(2)][0][int(match.group(3))]

    def describe_source(self) -> list[str]:
        lines = [f"npz: {self.npz_path} ({self.npz_path.stat().st_size} bytes), in memory; "
                 f"{'multi-label' if self.multilabel else 'single-label'}, official splits"]
        for split, (images, labels) in self.arrays.items():
            lines.append(f"  {split}_images {images.dtype} {tuple(images.shape)}, {split}_labels {labels.dtype} {tuple(labels.shape)}")
        return lines

    def fingerprint_table(self, table: pd.DataFrame) -> pd.DataFrame:
        """Every image lives in the one npz: its name and size stand for each image's file."""
        return table.assign(path=str(self.npz_path))
