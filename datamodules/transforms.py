"""Albumentations presets per imaging modality, plus the eval transform every preset shares.

A preset is a function ``(image_size) -> list of train-time augmentations``; normalisation and
tensor conversion are appended by :func:`build_transform`, so presets stay about the modality.

Reproducible augmentation: albumentations 2.0 draws from the Compose's own generators, which
``seed_everything`` does not touch. A training dataset therefore re-seeds its Compose before every
item with :func:`seed_transform` from (``data.seed``, epoch, sample index) -- see
:func:`augmentation_generators` -- so a sample's augmentation does not depend on the DataLoader worker
that draws it, the number of workers, the batch order or where a resumed run starts.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dermoscopy_preset(image_size: int) -> list[A.BasicTransform]:
    """Dermoscopy has no canonical orientation; colour varies by device and lighting."""
    return [
        A.RandomResizedCrop(size=(image_size, image_size), scale=(0.5, 1.0), ratio=(0.75, 1.333)),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.Rotate(limit=180, border_mode=0, p=0.5),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03, p=0.8),
    ]


def histopathology_preset(image_size: int) -> list[A.BasicTransform]:
    """Tissue patches have no orientation (flips, 90-degree turns are exact symmetries) and vary
    by stain batch and scanner: H&E stain jitter in the haematoxylin/eosin space (albumentations'
    ``HEStain``, the nearest to HED jitter). No colour inversion: it does not occur in H&E."""
    return [
        A.RandomResizedCrop(size=(image_size, image_size), scale=(0.6, 1.0), ratio=(0.9, 1.1)),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=1.0),
        A.HEStain(method="random_preset", intensity_scale_range=(0.8, 1.2), intensity_shift_range=(-0.1, 0.1), p=0.5),
    ]


def cxr_preset(image_size: int) -> list[A.BasicTransform]:
    """Chest X-ray: small affine jitter (patient positioning) and exposure changes only.

    No vertical flip (radiographs are never upside down) and no horizontal flip either: the
    heart lies on the patient's left, and flipping would create dextrocardia-like images and
    move left/right-sided findings (cardiomegaly, unilateral effusion) to the wrong side.
    """
    return [
        A.Resize(image_size, image_size),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-7, 7), border_mode=0, p=0.7),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.7),
    ]


def no_augmentation(image_size: int) -> list[A.BasicTransform]:
    """Resize only: used for evaluation and for feature extraction in stage 2."""
    return [A.Resize(image_size, image_size)]


PRESETS: dict[str, Callable[[int], list[A.BasicTransform]]] = {
    "dermoscopy": dermoscopy_preset,
    "histopathology": histopathology_preset,
    "cxr": cxr_preset,
    "none": no_augmentation,
}


def build_transform(
    preset: str,
    image_size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> A.Compose:
    """Compose a preset with normalisation and HWC uint8 -> CHW float tensor conversion."""
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r} (data.augment); valid: {sorted(PRESETS)}")
    return A.Compose([*PRESETS[preset](image_size), A.Normalize(mean=mean, std=std), ToTensorV2()])


def augmentation_generators(seed: int, epoch: int, index: int) -> tuple[np.random.Generator, random.Random]:
    """The generators that augment sample ``index`` in ``epoch`` of a run with ``data.seed=seed``.

    With ``ss = np.random.SeedSequence([seed, epoch, index])`` (all three non-negative; distinct
    triples give independent streams): ``np.random.default_rng(ss)`` and
    ``random.Random(int(ss.generate_state(1, np.uint64)[0]))``.
    """
    sequence = np.random.SeedSequence([seed, epoch, index])
    return np.random.default_rng(sequence), random.Random(int(sequence.generate_state(1, np.uint64)[0]))


def seed_transform(transform: A.Compose, seed: int, epoch: int, index: int) -> None:
    """Hand ``transform`` and all its transforms :func:`augmentation_generators` (one shared
    pair via ``Compose.set_random_state``: ~25 us an item, where ``set_random_seed`` would build a
    pair per transform, ~140 us)."""
    transform.set_random_state(*augmentation_generators(seed, epoch, index))


def transform_item(transform: A.Compose, image: np.ndarray, index: int, seed: int | None):
    """``transform(image=image)["image"]``, re-seeded first when ``seed`` is set (training data).

    The epoch comes with the index (``medmetric.datamodules.resumable.EpochIndex``, what the training
    loader's batch sampler yields); a plain ``int`` index counts as epoch 0.
    """
    if seed is not None:
        seed_transform(transform, seed, getattr(index, "epoch", 0), int(index))
    return transform(image=image)["image"]
