"""The DataModule family: index DataFrame -> grouped split -> Dataset -> sampler -> DataLoader.

A data source subclasses :class:`ImageClassificationDataModule` and implements only
:meth:`read_index` (and ``class_names``); splitting, validation of the files, datasets,
samplers and loaders are shared. Every check runs in ``setup``, before any training step.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler

from medmetric.datamodules.bad_images import SkipCounter, check_policy, skip_unreadable_collate
from medmetric.datamodules.cache import open_image_cache
from medmetric.datamodules.global_batch import per_device_batch_size
from medmetric.datamodules.images import (
    ImageReadError,
    find_missing,
    load_rgb,
    preload_images,
    report_once,
)
from medmetric.datamodules.integrity import dataset_fingerprint, warn_duplicates_across_splits
from medmetric.datamodules.resumable import ResumableDataLoader
from medmetric.datamodules.samplers import SAMPLERS
from medmetric.datamodules.splits import (
    SPLITS,
    check_groups_disjoint,
    grouped_stratified_split,
    read_split_csv,
    write_split_csv,
)
from medmetric.datamodules.transforms import build_transform, transform_item

log = logging.getLogger(__name__)

INDEX_COLUMNS = ["image_id", "path", "label", "group"]
SAMPLER_NAMES = ("instance", *SAMPLERS)


class ImageDataset(Dataset):
    """(image tensor, class id) pairs from file paths or from preloaded arrays.

    An unreadable image raises (``bad_image_policy="error"``, naming the file) or is skipped
    (``"skip"``: logged, counted in ``skipped`` across DataLoader workers, and dropped from its
    batch by :func:`skip_unreadable_collate`). An image smaller than ``image_size`` is upscaled
    by the transform, with a logged warning.

    ``seed`` (training data): the transform is re-seeded before every item from (seed, epoch,
    index) (datamodules/transforms.py::transform_item), so augmentations are reproducible.
    """

    def __init__(self, paths: Sequence[str], targets: Sequence[int], transform, images=None, loader=load_rgb,
                 bad_image_policy: str = "error", image_size: int | None = None, skipped: SkipCounter | None = None,
                 seed: int | None = None):
        self.paths = list(paths)
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.int64))
        self.transform = transform
        self.images = images
        self.loader = loader
        self.bad_image_policy = check_policy(bad_image_policy)
        self.image_size = image_size
        self.skipped = skipped if skipped is not None else SkipCounter()
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = self.images[i] if self.images is not None else self.loader(self.paths[i])
            if image is None:  # a preload that skipped this file
                raise ImageReadError(f"cannot decode image {self.paths[i]} (found unreadable at preload)")
        except ImageReadError as err:
            if self.bad_image_policy == "error":
                raise
            self.skipped.add(self.paths[i])
            log.warning("skipped unreadable image %s (data.bad_image_policy=skip): %s", self.paths[i], err)
            return None
        if self.image_size and min(image.shape[:2]) < self.image_size:
            report_once("small", "image %s is %dx%d, smaller than data.image_size=%d: upscaled",
                        self.paths[i], image.shape[1], image.shape[0], self.image_size)
        return transform_item(self.transform, image, i, self.seed), self.targets[i]


class FeatureDataset(Dataset):
    """(feature vector, class id) pairs: stage 2 on cached backbone features."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor):
        self.features = features
        self.targets = torch.as_tensor(targets, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.features[i], self.targets[i]


class RankShardSampler(Sampler[int]):
    """Evaluation indices ``rank, rank + world, ...``: every sample once over all ranks.

    Unlike ``DistributedSampler`` nothing is padded, so DDP-synced metrics count each test
    image exactly once.
    """

    def __init__(self, length: int, num_replicas: int, rank: int):
        self.indices = list(range(rank, length, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ImageClassificationDataModule(L.LightningDataModule):
    """Single-label image classification with a grouped (lesion/patient) stratified split.

    Args:
        data_dir: folder of the data set in its original on-disk format.
        image_size: square training/eval size in pixels (64 suits a CPU; 224+ on a GPU).
        batch_size: training batch size (and eval batch size unless ``eval_batch_size``).
        sampler: ``instance`` (shuffle), ``m_per_class`` (P classes x M images, stage 1),
            ``class_balanced`` (stage 2 cRT), ``sqrt`` or ``progressive`` (instance ->
            class-balanced over ``trainer.max_epochs``).
        m_per_class: M for the m-per-class sampler; ``batch_size`` must be a multiple of it.
        val_fraction, test_fraction, split_seed: the grouped stratified split.
        split_file: CSV where the split is written, and reused from when it exists. The CLI sets
            it to ``runs/<experiment>/split.csv``; without it the split lives in memory only.
        augment: albumentations preset for training (``none`` disables augmentation).
        preload: decode all images into RAM once at setup (fast epochs for small data sets, and
            every corrupt file is found before training starts).
        num_workers: DataLoader worker processes.
        seed: sampler and augmentation seed (the split has its own ``split_seed``): the sampler
            plans and every training image's augmentation are functions of (seed, epoch).
        bad_image_policy: ``error`` (default: an unreadable image stops the run naming the file)
            or ``skip`` (logged per file, counted, reported in results.json).
        global_batch_size: images per optimiser step over all devices; when set, the per-device
            ``batch_size`` is derived from it at setup (datamodules/global_batch.py).
        image_cache_dir: folder of the preprocessed image cache (datamodules/cache.py): images
            are decoded and resized once, then read as raw pixels (None: decode every time).
    """

    group_key = "group"  # what the ``group`` column means for this source (lesion, patient, ...)
    load_image = staticmethod(load_rgb)  # path -> RGB uint8 array; a source may read e.g. HDF5

    def __init__(
        self,
        data_dir: str,
        image_size: int = 64,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        sampler: str = "instance",
        m_per_class: int = 4,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 42,
        split_file: str | None = None,
        augment: str = "dermoscopy",
        preload: bool = False,
        num_workers: int = 2,
        seed: int = 0,
        bad_image_policy: str = "error",
        global_batch_size: int | None = None,
        image_cache_dir: str | None = None,
    ):
        super().__init__()
        self.bad_image_policy = check_policy(bad_image_policy)
        self.skipped = SkipCounter()
        if sampler not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {sampler!r} (data.sampler); valid: {list(SAMPLER_NAMES)}")
        self.data_dir = Path(data_dir)
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.sampler = sampler
        self.m_per_class = m_per_class
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.split_file = Path(split_file) if split_file else None
        self.augment = augment
        self.preload = preload
        self.num_workers = num_workers
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.image_cache_dir = image_cache_dir
        build_transform(augment, image_size)  # unknown preset fails here, not at the first batch
        self.table: pd.DataFrame | None = None
        self.datasets: dict[str, ImageDataset] = {}

    # --- what a data source provides -------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError

    def read_index(self) -> pd.DataFrame:
        """Return a DataFrame with columns image_id, path, label (class name), group.

        An optional ``split`` column fixes an official split: rows marked ``test`` stay test,
        validation is carved (grouped, stratified) from the ``train`` rows.
        """
        raise NotImplementedError

    # --- shared machinery ------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    shards_by_rank = True
    """Every loader shards itself under DDP; the CLI sets ``use_distributed_sampler=False``
    (Lightning's wrapping would break the batch samplers and pad the evaluation sets)."""

    def prepare_data(self) -> None:
        """Make the split file once (rank zero) if it does not exist yet."""
        if self.split_file is not None and not self.split_file.exists():
            table = self._indexed_table()
            table["split"] = self._new_split(table)
            write_split_csv(self.split_file, table)
            log.info("wrote split %s", self.split_file)

    def setup(self, stage: str | None = None) -> None:
        if self.table is not None:
            return
        table = self._indexed_table()
        if self.split_file is not None and self.split_file.exists():
            table["split"] = self._saved_split(table)
            log.info("reusing split %s", self.split_file)
        else:
            table["split"] = self._new_split(table)
        self._check_every_class_in_every_split(table)
        self.table = table
        self._derive_batch_size()
        images = self._decoded_images(table["path"].tolist())
        train_tf = build_transform(self.augment, self.image_size)
        eval_tf = build_transform("none", self.image_size)
        for split in SPLITS:
            rows = np.flatnonzero(table["split"].to_numpy() == split)
            self.datasets[split] = ImageDataset(
                table["path"].to_numpy()[rows],
                table["target"].to_numpy()[rows],
                train_tf if split == "train" else eval_tf,
                None if images is None else images.take(rows) if hasattr(images, "take") else [images[i] for i in rows],
                self.load_image,
                self.bad_image_policy,
                self.image_size,
                self.skipped,
                self.seed if split == "train" else None,
            )

    def _decoded_images(self, paths: list[str]):
        """Images decoded ahead: the memory-mapped cache, RAM (preload), both, or None."""
        if self.image_cache_dir:
            self._check_cacheable()
            cached = open_image_cache(paths, self.image_size, self.image_cache_dir)
            return [cached[i] for i in range(len(cached))] if self.preload else cached
        return self._preload(paths) if self.preload else None

    def _check_cacheable(self) -> None:
        if self.load_image is not load_rgb:
            raise ValueError(
                f"data.image_cache_dir: {type(self).__name__} reads images through its own loader "
                "(e.g. HDF5 patches), which the image cache does not support; leave image_cache_dir unset"
            )
        if self.bad_image_policy == "skip":
            raise ValueError(
                "data.image_cache_dir cannot be combined with data.bad_image_policy=skip: the cache is "
                "built from every image. Remove the unreadable files (`medmetric check-data` lists them) "
                "or leave image_cache_dir unset"
            )

    def _derive_batch_size(self) -> None:
        if self.global_batch_size is not None:
            world = self.trainer.world_size if self.trainer is not None else 1
            accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
            self.batch_size = per_device_batch_size(self.global_batch_size, world, accumulate)

    def _indexed_table(self) -> pd.DataFrame:
        table = self.read_index()
        missing_cols = [c for c in INDEX_COLUMNS if c not in table.columns]
        if missing_cols:
            raise ValueError(f"{type(self).__name__}.read_index returned no columns {missing_cols}")
        table = table.reset_index(drop=True)
        fixed = table["split"].astype(str).to_numpy() if "split" in table.columns else None
        table = table[INDEX_COLUMNS].copy()
        if fixed is not None:
            bad = sorted(set(fixed) - {"train", "test"})
            if bad:
                raise ValueError(f"{type(self).__name__}.read_index: split column values must be train/test, got {bad[:3]}")
            table["fixed_split"] = fixed
        if table.empty:
            raise ValueError(f"no images found in {self.data_dir}")
        missing = self.find_missing_images(table["path"].tolist())
        if missing:
            ids = table["image_id"].iloc[missing[:5]].tolist()
            raise FileNotFoundError(
                f"{len(missing)} of {len(table)} images listed for {self.data_dir} are missing "
                f"(first ids: {ids}; expected e.g. {table['path'].iloc[missing[0]]}). Put the image "
                "files in place or remove their rows from the metadata CSV before training"
            )
        table["target"] = table["label"].map({c: i for i, c in enumerate(self.class_names)})
        return table

    def _new_split(self, table: pd.DataFrame) -> np.ndarray:
        if "fixed_split" in table.columns:  # official test set kept; val carved from train
            split = table["fixed_split"].to_numpy().astype(object)
            train = np.flatnonzero(split == "train")
            split[train] = grouped_stratified_split(
                table["label"].iloc[train], table["group"].iloc[train], self.val_fraction, 0.0, self.split_seed
            )
        else:
            split = grouped_stratified_split(
                table["label"], table["group"], self.val_fraction, self.test_fraction, self.split_seed
            )
        check_groups_disjoint(table["group"], pd.Series(split), source="new split",
                              image_ids=table["image_id"], group_key=self.group_key)
        warn_duplicates_across_splits(table, split, source=f"new split of {self.data_dir}")
        return split

    def _saved_split(self, table: pd.DataFrame) -> np.ndarray:
        """The split of ``split_file`` per row of ``table``, checked against the index (a source
        with an official split also checks that the file keeps it)."""
        return read_split_csv(self.split_file, table, self.group_key).to_numpy()

    # --- what `medmetric check-data` inspects (experiments/check_data.py) ---------------------
    def check_data_table(self) -> pd.DataFrame:
        """The checked index, unsplit: image_id, path, label, group (+ fixed_split / official).

        ``path`` is whatever :meth:`load_image` reads: a file, or a reference that is not a plain
        file (HDF5 slice, npz row). A multi-label source puts its multi-hot targets
        (``class_names`` order) in ``table.attrs["targets"]``.
        """
        return self._indexed_table()

    def describe_source(self) -> list[str]:
        """Extra lines for check-data about where the images live (e.g. in-memory arrays)."""
        return []

    def find_missing_images(self, paths: Sequence[str]) -> list[int]:
        """Positions of images that do not exist (files by default; a source may override)."""
        return find_missing(paths)

    def _preload(self, paths: Sequence[str]) -> list[np.ndarray]:
        skip = self.bad_image_policy == "skip"
        if self.load_image is load_rgb:
            return preload_images(paths, self.image_size, skip_unreadable=skip)
        return [self._load_or_none(p) if skip else self.load_image(p) for p in paths]

    def _load_or_none(self, path: str):
        try:
            return self.load_image(path)
        except ImageReadError:
            return None  # counted and logged by ImageDataset when fetched

    def _check_every_class_in_every_split(self, table: pd.DataFrame) -> None:
        sizes = table["split"].value_counts()
        empty_splits = [s for s in SPLITS if sizes.get(s, 0) == 0]
        if empty_splits:
            raise ValueError(
                f"split {empty_splits[0]!r} of {self.data_dir} is empty ({ {s: int(sizes.get(s, 0)) for s in SPLITS} }): "
                "every run needs train images, val images (model selection) and test images (the score). "
                "Set data.val_fraction and data.test_fraction > 0, or fix the split file (delete it to make a new one)"
            )
        counts = pd.crosstab(table["label"], table["split"]).reindex(
            index=self.class_names, columns=list(SPLITS), fill_value=0
        )
        empty = [(c, s) for c in self.class_names for s in SPLITS if counts.loc[c, s] == 0]
        if empty:
            where = ", ".join(f"{c!r} in {s}" for c, s in empty[:6])
            totals = counts.sum(axis=1)
            raise ValueError(
                f"a class has no images in a split of {self.split_file or self.data_dir}: {where} (class totals: "
                f"{ {c: int(totals[c]) for c, _ in empty[:6]} }, {self.group_key}s are kept whole). "
                "Add images of that class, lower data.val_fraction/data.test_fraction, or change "
                "data.split_seed (delete the split file first if one was saved)"
            )

    @property
    def class_counts(self) -> list[int]:
        """Training images per class, in ``class_names`` order (for re-balancing losses)."""
        self._require_setup()
        targets = self.datasets["train"].targets
        return torch.bincount(targets, minlength=self.num_classes).tolist()

    def split_sha256(self) -> str:
        """Content hash of the split (image id -> split), identical for identical splits."""
        self._require_setup()
        text = "\n".join(f"{i},{s}" for i, s in sorted(zip(self.table["image_id"], self.table["split"], strict=True)))
        return hashlib.sha256(text.encode()).hexdigest()

    def fingerprint(self, table: pd.DataFrame | None = None) -> str:
        """Dataset fingerprint: ids, relative paths, sizes, labels, groups, split (integrity.py).

        Of the set-up table, or of ``table`` (with a split column) when given: check-data
        fingerprints its own table without a setup.
        """
        if table is not None:
            return dataset_fingerprint(table, self.data_dir, table["split"])
        self._require_setup()
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = dataset_fingerprint(self.table, self.data_dir, self.table["split"])
        return self._fingerprint

    @property
    def skipped_images(self) -> int:
        """Unreadable images skipped so far under ``bad_image_policy=skip`` (all workers)."""
        return self.skipped.value

    def _require_setup(self) -> None:
        if self.table is None:
            raise RuntimeError("call setup() on the DataModule first")

    # --- loaders ---------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        world, rank = self._world()
        if self.sampler == "instance":
            sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=self.seed, drop_last=True)
            batches = BatchSampler(sampler, self.batch_size, drop_last=True)
            return self._resumable(ResumableDataLoader(dataset, batches, self._epoch_progress, **self._loader_kwargs()))
        kwargs = {}
        if self.sampler == "m_per_class":
            kwargs["m_per_class"] = self.m_per_class
        if self.sampler == "progressive":
            kwargs["total_epochs"] = max(1, getattr(self.trainer, "max_epochs", None) or 1)
        batch_sampler = SAMPLERS[self.sampler](
            dataset.targets, batch_size=self.batch_size, seed=self.seed,
            num_replicas=world, rank=rank, **kwargs,
        )
        return self._resumable(ResumableDataLoader(dataset, batch_sampler, self._epoch_progress, **self._loader_kwargs()))

    # --- mid-epoch resume (datamodules/resumable.py) ------------------------------------------
    def _epoch_progress(self) -> tuple[int, int]:
        """(epoch, batches of it trained; 0 once it is over): the training loader's state in a checkpoint."""
        loop = self.trainer.fit_loop
        done = loop.epoch_loop.batch_progress.current.completed
        if done >= self.trainer.num_training_batches:  # the epoch is over (limit_train_batches included)
            done = 0
        return loop.epoch_progress.current.processed, done

    def state_dict(self) -> dict:
        return {"train_progress": list(self._epoch_progress())} if self.trainer is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_progress = state_dict.get("train_progress")

    def _resumable(self, loader: ResumableDataLoader) -> ResumableDataLoader:
        progress, self._resume_progress = getattr(self, "_resume_progress", None), None
        if progress:
            loader.resume_at(*progress)
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def ordered_dataloader(self, split: str, sharded: bool = True) -> DataLoader:
        """All of ``split`` in order with the eval transform (no augmentation).

        Sharded by rank unless ``sharded=False``. Used to extract features (feature cache,
        NCM/kNN/tau-norm fitting).
        """
        dataset = self.datasets[split]
        if isinstance(dataset, ImageDataset):
            dataset = ImageDataset(dataset.paths, dataset.targets, build_transform("none", self.image_size), dataset.images,
                                   dataset.loader, self.bad_image_policy, self.image_size, self.skipped)
        world, rank = self._world() if sharded else (1, 0)
        sampler = RankShardSampler(len(dataset), world, rank)
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler, **self._loader_kwargs())

    def use_features(self, features: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Serve cached features instead of images (same splits, same order, same targets)."""
        for split, (values, targets) in features.items():
            if not torch.equal(torch.as_tensor(targets), self.datasets[split].targets):
                raise ValueError(f"cached features of split {split!r} do not match its images; delete the cache")
            self.datasets[split] = FeatureDataset(values, targets)

    def _eval_loader(self, split: str, dataset: Dataset | None = None) -> DataLoader:
        dataset = dataset if dataset is not None else self.datasets[split]
        world, rank = self._world()
        sampler = RankShardSampler(len(dataset), world, rank)
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler, **self._loader_kwargs())

    def _loader_kwargs(self) -> dict:
        kwargs = {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}
        if self.bad_image_policy == "skip":
            kwargs["collate_fn"] = skip_unreadable_collate
        return kwargs

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)


def read_csv_checked(path: Path, required: Sequence[str], what: str) -> pd.DataFrame:
    """Read an index CSV, failing with the file, the missing columns and the expected ones."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}. Check data.data_dir")
    table = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}; found {list(table.columns)}, expected at least "
            f"{list(required)}. Rename the columns to the {what} names"
        )
    return table
