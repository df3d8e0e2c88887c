"""The DataModule family: index DataFrame -> split -> Dataset -> sampler -> DataLoader.

A data source subclasses :class:`ImageClassificationDataModule` and provides only what is
about its files: ``class_names``, :meth:`read_index` (and, when its images are not plain
files, ``load_image`` / :meth:`find_missing_images` / :meth:`describe_source` /
:meth:`fingerprint_table`). What differs by kind of data is plugged in, not overridden:

* ``split_planner`` (split_planner.py): grouped, official or saved splits and their checks;
* ``task`` (tasks.py): targets, split checks, datasets, and the one eval transform that the
  val/test loaders and :meth:`ordered_dataloader` share;
* ``image_store`` (image_store.py): what is decoded ahead (nothing, RAM, the disk cache).

The machinery here (setup, loaders, resume state, hashes) is the same for every source; a test
(tests/test_composable_data.py) refuses a subclass that overrides it. Every check runs in
``setup``, before any training step.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from medmetric.datamodules.bad_images import SkipCounter, check_policy, skip_unreadable_collate
from medmetric.datamodules.datasets import FeatureDataset, ImageDataset, RankShardSampler
from medmetric.datamodules.global_batch import per_device_batch_size
from medmetric.datamodules.image_store import FileImages
from medmetric.datamodules.images import find_missing, load_rgb
from medmetric.datamodules.integrity import dataset_fingerprint
from medmetric.datamodules.resumable import ResumableDataLoader
from medmetric.datamodules.samplers import SAMPLERS
from medmetric.datamodules.split_planner import GroupedSplit, check_every_class_in_every_split
from medmetric.datamodules.splits import write_split_csv
from medmetric.datamodules.tasks import SingleLabelTask
from medmetric.datamodules.transforms import build_transform

__all__ = ["FeatureDataset", "ImageClassificationDataModule", "ImageDataset", "RankShardSampler", "read_csv_checked"]

log = logging.getLogger(__name__)

INDEX_COLUMNS = ["image_id", "path", "label", "group"]
SAMPLER_NAMES = ("instance", *SAMPLERS)


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

    # --- the parts a source plugs in (instead of overriding the machinery below) -----------
    split_planner = GroupedSplit()  # new / saved split and its leak checks (split_planner.py)
    task = SingleLabelTask()  # targets, split checks, datasets, train and eval transform (tasks.py)
    image_store = FileImages()  # what is decoded ahead: nothing, RAM, the disk cache (image_store.py)
    missing_images_fix = "Put the image files in place or remove their rows from the metadata CSV before training"

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
        """Index -> split (planner) -> split checks (task) -> decoded images (store) -> datasets (task)."""
        if self.table is not None:
            return
        table = self._indexed_table()
        if self.split_file is not None and self.split_file.exists():
            table["split"] = self._saved_split(table)
            log.info("reusing split %s", self.split_file)
        else:
            table["split"] = self._new_split(table)
        self.task.check_splits(self, table)
        self.table = table
        self._derive_batch_size()
        images = self.image_store.decoded(self, table["path"].tolist())
        self.datasets = self.task.datasets(self, table, images)

    def _derive_batch_size(self) -> None:
        if self.global_batch_size is not None:
            world = self.trainer.world_size if self.trainer is not None else 1
            accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
            self.batch_size = per_device_batch_size(self.global_batch_size, world, accumulate)

    def _indexed_table(self) -> pd.DataFrame:
        """``read_index`` checked: required columns, official split values, files present, targets."""
        table = self.read_index()
        targets = table.attrs.get("targets")
        missing_cols = [c for c in INDEX_COLUMNS if c not in table.columns]
        if missing_cols:
            raise ValueError(f"{type(self).__name__}.read_index returned no columns {missing_cols}")
        table = table.reset_index(drop=True)
        fixed = table["split"].astype(str).to_numpy() if "split" in table.columns else None
        table = table[INDEX_COLUMNS + [c for c in self.split_planner.keep_columns if c in table.columns]].copy()
        if fixed is not None:
            allowed = self.split_planner.fixed_values
            bad = sorted(set(fixed) - set(allowed))
            if bad:
                raise ValueError(f"{type(self).__name__}.read_index: split column values must be {'/'.join(allowed)}, got {bad[:3]}")
            table["fixed_split"] = fixed
        if targets is not None:
            table.attrs["targets"] = targets
        if table.empty:
            raise ValueError(f"no images found in {self.data_dir}")
        missing = self.find_missing_images(table["path"].tolist())
        if missing:
            ids = table["image_id"].iloc[missing[:5]].tolist()
            raise FileNotFoundError(
                f"{len(missing)} of {len(table)} images listed for {self.data_dir} are missing "
                f"(first ids: {ids}; expected e.g. {table['path'].iloc[missing[0]]}). {self.missing_images_fix}"
            )
        self.task.targets(self, table)
        return table

    def _new_split(self, table: pd.DataFrame):
        """A new split of the checked index (``split_planner``; check-data calls it too)."""
        return self.split_planner.new(self, table)

    def _saved_split(self, table: pd.DataFrame):
        """The split of ``split_file`` per row of ``table``, checked by the ``split_planner``."""
        return self.split_planner.saved(self, table)

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

    def _check_every_class_in_every_split(self, table: pd.DataFrame) -> None:
        check_every_class_in_every_split(table, self.class_names, self.split_file or self.data_dir, self.data_dir, self.group_key)

    def fingerprint_table(self, table: pd.DataFrame) -> pd.DataFrame:
        """The rows the fingerprint hashes (a source whose images share one file may rewrite ``path``)."""
        return table

    @property
    def class_counts(self) -> list[int]:
        """Training images per class (multi-label: positives per label), ``class_names`` order."""
        self._require_setup()
        return self.task.class_counts(self, self.datasets["train"])

    @property
    def num_train_images(self) -> int:
        """Training images (multi-label: negatives per label = num_train_images - class_counts)."""
        self._require_setup()
        return len(self.datasets["train"])

    def split_sha256(self) -> str:
        """Content hash of the split (image id -> split), identical for identical splits."""
        self._require_setup()
        text = "\n".join(f"{i},{s}" for i, s in sorted(zip(self.table["image_id"], self.table["split"], strict=True)))
        if getattr(self, "unseen_labels", None):  # a GZSL split differs from the ordinary one
            text += "\nunseen:" + ",".join(self.unseen_labels)
        return hashlib.sha256(text.encode()).hexdigest()

    def fingerprint(self, table: pd.DataFrame | None = None) -> str:
        """Dataset fingerprint: ids, relative paths, sizes, labels, groups, split (integrity.py).

        Of the set-up table, or of ``table`` (with a split column) when given: check-data
        fingerprints its own table without a setup.
        """
        if table is not None:
            table = self.fingerprint_table(table)
            return dataset_fingerprint(table, self.data_dir, table["split"])
        self._require_setup()
        if getattr(self, "_fingerprint", None) is None:
            table = self.fingerprint_table(self.table)
            self._fingerprint = dataset_fingerprint(table, self.data_dir, table["split"])
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
        """All of ``split`` in order with the task's eval transform (the val/test loaders' one).

        Sharded by rank unless ``sharded=False``. Used to extract features (feature cache,
        NCM/kNN/tau-norm fitting), which must see the tensors evaluation sees.
        """
        dataset = self.task.ordered(self, self.datasets[split])
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
