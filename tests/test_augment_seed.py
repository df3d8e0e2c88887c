"""Reproducible augmentation: every training image's augmentation is a function of
(data.seed, epoch, sample index) only.

The reference is independent of the datasets and loaders: the image file decoded with PIL, a
freshly built Compose of the same preset, given ``np.random.default_rng(ss)`` and
``random.Random(ss.generate_state(1, uint64)[0])`` with ``ss = SeedSequence([seed, epoch, index])``
(the documented rule, computed here, not by medmetric.datamodules.transforms).
"""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from medmetric.datamodules.chest_xray import ChestXray14DataModule
from medmetric.datamodules.resumable import EpochIndex
from medmetric.datamodules.skin import HAM10000DataModule
from medmetric.datamodules.transforms import build_transform

SIZE = 32
EPOCHS = (0, 1, 2)


def ham(root, split_file, **kwargs) -> HAM10000DataModule:
    options = {"image_size": SIZE, "batch_size": 16, "num_workers": 0, "augment": "dermoscopy",
               "sampler": "m_per_class", "m_per_class": 4, "split_file": str(split_file), "seed": 3}
    dm = HAM10000DataModule(str(root), **{**options, **kwargs})
    dm.setup()
    return dm


def seed_by_rule(compose, seed: int, epoch: int, index: int) -> None:
    sequence = np.random.SeedSequence([seed, epoch, index])
    compose.set_random_state(np.random.default_rng(sequence), random.Random(int(sequence.generate_state(1, np.uint64)[0])))


def reference_image(path: str, preset: str, seed: int, epoch: int, index: int, **norm) -> torch.Tensor:
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"))
    fresh = build_transform(preset, SIZE, **norm)
    seed_by_rule(fresh, seed, epoch, index)
    return fresh(image=pixels)["image"]


def epochs_of_batches(dm, epochs=EPOCHS) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """What Lightning sees: set_epoch on the loader's batch sampler, then one pass, per epoch
    (one loader, so persistent workers stay alive across epochs as in a real fit)."""
    loader = dm.train_dataloader()
    seen = {}
    for epoch in epochs:
        loader.batch_sampler.sampler.set_epoch(epoch)  # where Lightning calls it
        seen[epoch] = [(x.clone(), y.clone()) for x, y in loader]
    return seen


def assert_same_batches(a, b) -> None:
    assert a.keys() == b.keys()
    for epoch in a:
        assert len(a[epoch]) == len(b[epoch]) > 0
        for (xa, ya), (xb, yb) in zip(a[epoch], b[epoch], strict=True):
            assert torch.equal(ya, yb)
            assert torch.equal(xa, xb), f"epoch {epoch}: augmented images differ"


@pytest.fixture(scope="module")
def split_file(ham_root, tmp_path_factory):
    path = tmp_path_factory.mktemp("augseed") / "split.csv"
    dm = HAM10000DataModule(str(ham_root), image_size=SIZE, split_file=str(path), num_workers=0)
    dm.prepare_data()
    return path


@pytest.fixture(scope="module")
def batches_seed3(ham_root, split_file):
    return epochs_of_batches(ham(ham_root, split_file))


def test_same_seed_gives_identical_augmented_batches_across_datamodule_instances(ham_root, split_file, batches_seed3):
    assert_same_batches(epochs_of_batches(ham(ham_root, split_file)), batches_seed3)


def test_same_seed_gives_identical_batches_with_two_persistent_workers(ham_root, split_file, batches_seed3):
    dm = ham(ham_root, split_file, num_workers=2)
    assert dm.train_dataloader().persistent_workers
    assert_same_batches(epochs_of_batches(dm), batches_seed3)


def test_batches_equal_an_independently_seeded_fresh_compose(ham_root, split_file, batches_seed3):
    dm = ham(ham_root, split_file)
    dataset = dm.datasets["train"]
    loader = dm.train_dataloader()
    for epoch in (0, 2):
        loader.batch_sampler.set_epoch(epoch)
        plan = list(loader.batch_sampler)
        for batch, (x, y) in zip(plan[:2], batches_seed3[epoch][:2], strict=True):
            for row, index in enumerate(batch):
                expected = reference_image(dataset.paths[index], "dermoscopy", 3, epoch, int(index))
                assert int(y[row]) == int(dataset.targets[index])
                assert torch.equal(x[row], expected), (epoch, int(index))
    # the reference is augmented at all: it differs from the eval transform and between epochs
    path = dataset.paths[0]
    with Image.open(path) as img:
        plain = build_transform("none", SIZE)(image=np.asarray(img.convert("RGB")))["image"]
    augmented = [reference_image(path, "dermoscopy", 3, epoch, 0) for epoch in EPOCHS]
    assert not torch.equal(augmented[0], plain)
    assert not torch.equal(augmented[0], augmented[1]) and not torch.equal(augmented[1], augmented[2])


def test_different_seed_gives_different_augmentations(ham_root, split_file, batches_seed3):
    other = ham(ham_root, split_file, seed=4)
    assert not torch.equal(torch.cat([x for x, _ in epochs_of_batches(other, (0,))[0]]),
                           torch.cat([x for x, _ in batches_seed3[0]]))
    # per sample, not only through another sampler plan: the same index, epoch and file
    ours, theirs = ham(ham_root, split_file).datasets["train"], other.datasets["train"]
    differ = [not torch.equal(ours[EpochIndex(i, 0)][0], theirs[EpochIndex(i, 0)][0]) for i in range(8)]
    assert all(differ)


def test_epoch_travels_with_the_index_and_survives_resume_skip(ham_root, split_file):
    dm = ham(ham_root, split_file)
    loader = dm.train_dataloader()
    loader.batch_sampler.set_epoch(1)
    full = list(loader.batch_sampler)
    assert all(isinstance(i, EpochIndex) and i.epoch == 1 for batch in full for i in batch)
    copy = pickle.loads(pickle.dumps(full[0][0]))  # what a DataLoader worker receives
    assert type(copy) is EpochIndex and (int(copy), copy.epoch) == (int(full[0][0]), 1)
    resumed = dm.train_dataloader()
    resumed.resume_at(1, 2)
    rest = list(resumed.batch_sampler)
    assert rest == full[2:] and all(i.epoch == 1 for batch in rest for i in batch)
    # the resumed loader's images are the uninterrupted epoch's, batch for batch
    resumed = dm.train_dataloader()
    resumed.resume_at(1, 2)
    uninterrupted = epochs_of_batches(dm, (1,))[1]
    for (xa, _), (xb, _) in zip(list(resumed), uninterrupted[2:], strict=True):
        assert torch.equal(xa, xb)


def test_eval_splits_are_not_reseeded_and_stay_unaugmented(ham_root, split_file):
    dm = ham(ham_root, split_file)
    assert dm.datasets["train"].seed == 3
    assert dm.datasets["val"].seed is None and dm.datasets["test"].seed is None


def test_multilabel_chest_xray_augmentation_follows_the_rule(chestxray14_root, tmp_path):
    kwargs = {"image_size": SIZE, "batch_size": 8, "num_workers": 0, "seed": 5, "augment": "cxr",
              "split_file": str(tmp_path / "split.csv")}
    one, two = ChestXray14DataModule(str(chestxray14_root), **kwargs), ChestXray14DataModule(str(chestxray14_root), **kwargs)
    one.setup()
    two.setup()
    train = one.datasets["train"]
    assert train.seed == 5 and one.datasets["val"].seed is None
    from medmetric.datamodules.xray_images import gray_normalisation

    norm = gray_normalisation(3)
    for epoch, index in ((0, 0), (1, 0), (2, 7)):
        item = EpochIndex(index, epoch)
        x, _ = train[item]
        assert torch.equal(x, two.datasets["train"][item][0])
        with Image.open(train.paths[index]) as img:
            gray = np.asarray(img.convert("L"))
        fresh = build_transform("cxr", SIZE, **norm)
        seed_by_rule(fresh, 5, epoch, index)
        assert torch.equal(x, fresh(image=np.repeat(gray[:, :, None], 3, axis=2))["image"]), (epoch, index)


@pytest.mark.parametrize(("name", "label_width"), [("pneumoniamnist", 1), ("chestmnist", 14)])  # ImageDataset, MultiLabelImageDataset
def test_medmnist_augmentation_follows_the_rule(tmp_path, name, label_width):
    from medmetric.datamodules.medmnist import MedMNISTDataModule
    from medmetric.datamodules.xray_images import gray_normalisation
    from tests.test_medmnist import write_npz

    arrays = write_npz(tmp_path / f"{name}.npz", label_width=label_width)
    dm = MedMNISTDataModule(npz_path=str(tmp_path / f"{name}.npz"), image_size=SIZE, augment="cxr", seed=9)
    dm.setup()
    train = dm.datasets["train"]
    assert train.seed == 9 and dm.datasets["test"].seed is None
    for epoch, index in ((0, 1), (3, 4)):
        fresh = build_transform("cxr", SIZE, **gray_normalisation(3))
        seed_by_rule(fresh, 9, epoch, index)
        gray = arrays["train_images"][index]
        assert torch.equal(train[EpochIndex(index, epoch)][0], fresh(image=np.repeat(gray[:, :, None], 3, axis=2))["image"])
