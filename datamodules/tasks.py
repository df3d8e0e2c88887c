"""Task dataset factories: index rows -> per-split datasets, and the one eval transform.

A DataModule plugs one factory in (``task`` class attribute). The factory owns what depends on
the learning task rather than on where the data comes from:

* the targets (class ids from the ``label`` column, or multi-hot rows from the source);
* the checks of a finished split (every class in every split, or non-empty splits);
* the training transform and **the eval transform**: val/test loaders and
  ``ordered_dataloader`` (feature cache, NCM/kNN/tau-norm fitting) are all built from
  :meth:`TaskDatasets.eval_transform`, so they see the same tensors for the same image. Its
  normalisation follows ``in_chans`` (xray_images.gray_normalisation: ImageNet statistics for
  3 channels, their mean for 1), for every source;
* class counts for re-balancing.

A new task (e.g. ECG beats or expression vectors: samples that are not images) subclasses
:class:`TaskDatasets` and implements ``targets``/``build``/``ordered``; the DataModule's split,
loaders, resume state and fingerprint do not change.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from medmetric.datamodules.datasets import ImageDataset, MultiLabelImageDataset
from medmetric.datamodules.split_planner import check_every_class_in_every_split
from medmetric.datamodules.splits import SPLITS
from medmetric.datamodules.transforms import build_transform
from medmetric.datamodules.xray_images import gray_normalisation


class TaskDatasets:
    """Shared by the image tasks: transforms from ``dm.augment``, ``dm.image_size``, ``dm.in_chans``."""

    multilabel = False

    @staticmethod
    def normalisation(dm) -> dict:
        """Mean/std for ``dm.in_chans`` channels (3 when the source has no ``in_chans``)."""
        return gray_normalisation(getattr(dm, "in_chans", 3))

    def train_transform(self, dm):
        return build_transform(dm.augment, dm.image_size, **self.normalisation(dm))

    def eval_transform(self, dm):
        """The transform of every eval path: val/test loaders and ``ordered_dataloader``."""
        return build_transform("none", dm.image_size, **self.normalisation(dm))

    def datasets(self, dm, table: pd.DataFrame, images) -> dict[str, Dataset]:
        """One dataset per split (train augmented and seeded, val/test with the eval transform)."""
        train_tf, eval_tf = self.train_transform(dm), self.eval_transform(dm)
        keep = self.kept(dm, table)
        return {
            split: self.build(dm, split, np.flatnonzero((table["split"].to_numpy() == split) & keep), table, images,
                              train_tf if split == "train" else eval_tf, dm.seed if split == "train" else None)
            for split in SPLITS
        }

    def kept(self, dm, table: pd.DataFrame) -> np.ndarray:
        """Rows the datasets serve (all by default)."""
        return np.ones(len(table), dtype=bool)

    # --- what a task implements ------------------------------------------------------------
    def targets(self, dm, table: pd.DataFrame) -> None:
        """Add the targets to the checked index (a ``target`` column or ``attrs['targets']``)."""
        raise NotImplementedError

    def check_splits(self, dm, table: pd.DataFrame) -> None:
        """Refuse a split the task cannot train or score on."""

    def build(self, dm, split: str, rows: np.ndarray, table: pd.DataFrame, images, transform, seed) -> Dataset:
        """The dataset of ``split``: index rows ``rows`` (and their decoded ``images`` if any)."""
        raise NotImplementedError

    def ordered(self, dm, dataset: Dataset) -> Dataset:
        """``dataset`` with the eval transform and no augmentation seed (cached features as they are)."""
        raise NotImplementedError

    def class_counts(self, dm, dataset: Dataset) -> list[int]:
        raise NotImplementedError


def _take(images, rows: np.ndarray):
    if images is None:
        return None
    return images.take(rows) if hasattr(images, "take") else [images[i] for i in rows]


class SingleLabelTask(TaskDatasets):
    """One class per image: ``label`` names a class of ``dm.class_names``; ImageDataset."""

    def targets(self, dm, table: pd.DataFrame) -> None:
        table["target"] = table["label"].map({c: i for i, c in enumerate(dm.class_names)})

    def check_splits(self, dm, table: pd.DataFrame) -> None:
        check_every_class_in_every_split(table, dm.class_names, dm.split_file or dm.data_dir, dm.data_dir, dm.group_key)

    def build(self, dm, split, rows, table, images, transform, seed) -> Dataset:
        return ImageDataset(
            table["path"].to_numpy()[rows], table["target"].to_numpy()[rows], transform, _take(images, rows),
            dm.load_image, dm.bad_image_policy, dm.image_size, dm.skipped, seed,
        )

    def ordered(self, dm, dataset: Dataset) -> Dataset:
        if not isinstance(dataset, ImageDataset):
            return dataset
        return ImageDataset(dataset.paths, dataset.targets, self.eval_transform(dm), dataset.images,
                            dataset.loader, dm.bad_image_policy, dm.image_size, dm.skipped)

    def class_counts(self, dm, dataset: Dataset) -> list[int]:
        return torch.bincount(dataset.targets, minlength=dm.num_classes).tolist()


class MultiLabelTask(TaskDatasets):
    """Multi-hot float32 targets (``table.attrs['targets']``, ``class_names`` order) from the source.

    Generalised zero-shot (``dm.unseen_labels``): in train and val the unseen columns are zeroed
    and images whose only findings are unseen are held out (``dm.held_out_unseen_only`` counts
    them); test keeps every label.
    """

    multilabel = True

    def targets(self, dm, table: pd.DataFrame) -> None:
        targets = table.attrs.get("targets")
        if targets is None or len(targets) != len(table):
            raise ValueError(f"{type(dm).__name__}.read_index: a multi-label source puts its multi-hot targets "
                             "(one row per index row, class_names order) in table.attrs['targets']")

    def kept(self, dm, table: pd.DataFrame) -> np.ndarray:
        targets = table.attrs["targets"]
        keep = np.ones(len(table), dtype=bool)
        unseen = list(getattr(dm, "unseen_labels", None) or [])
        if unseen:
            unseen_idx = [dm.class_names.index(n) for n in unseen]
            seen_idx = [i for i in range(len(dm.class_names)) if i not in unseen_idx]
            only_unseen = (targets[:, unseen_idx].sum(1) > 0) & (targets[:, seen_idx].sum(1) == 0)
            keep = ~(only_unseen & (table["split"] != "test").to_numpy())
        dm.held_out_unseen_only = int((~keep).sum())
        return keep

    def build(self, dm, split, rows, table, images, transform, seed) -> Dataset:
        split_targets = table.attrs["targets"][rows].copy()
        unseen = list(getattr(dm, "unseen_labels", None) or [])
        if unseen and split != "test":
            split_targets[:, [dm.class_names.index(n) for n in unseen]] = 0.0
        if len(rows) == 0:
            raise ValueError(f"{dm.data_dir}: the {split} split is empty; check the official lists and data.val_fraction")
        return MultiLabelImageDataset(table["path"].to_numpy()[rows], split_targets, transform,
                                      _take(images, rows), dm.in_chans, seed)

    def ordered(self, dm, dataset: Dataset) -> Dataset:
        if not isinstance(dataset, MultiLabelImageDataset):
            return dataset
        return dataset.with_transform(self.eval_transform(dm))

    def class_counts(self, dm, dataset: Dataset) -> list[int]:
        """Positive training images per label (0 for unseen labels)."""
        return dataset.targets.sum(0).round().long().tolist()
