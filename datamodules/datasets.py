"""The datasets every DataModule serves: images (single- or multi-label) and cached features.

Moved here from base.py and chest_xray.py (both still export them) so that the task dataset
factories (tasks.py) can build them without importing a DataModule.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from medmetric.datamodules.bad_images import SkipCounter, check_policy
from medmetric.datamodules.images import ImageReadError, load_rgb, report_once
from medmetric.datamodules.transforms import transform_item
from medmetric.datamodules.xray_images import load_xray, to_channels

log = logging.getLogger(__name__)


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


class MultiLabelImageDataset(Dataset):
    """(image tensor, multi-hot float32 target) from X-ray files or preloaded gray arrays.

    ``seed`` (training data): augmentation re-seeded per item from (seed, epoch, index).
    """

    def __init__(self, paths: Sequence[str], targets, transform, images=None, in_chans: int = 3, seed: int | None = None):
        self.paths = list(paths)
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.float32))
        self.transform = transform
        self.images = images
        self.in_chans = in_chans
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        gray = self.images[i] if self.images is not None else load_xray(self.paths[i])
        return transform_item(self.transform, to_channels(gray, self.in_chans), i, self.seed), self.targets[i]

    def with_transform(self, transform, seed: int | None = None) -> MultiLabelImageDataset:
        return MultiLabelImageDataset(self.paths, self.targets, transform, self.images, self.in_chans, seed)
