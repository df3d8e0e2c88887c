"""The composable DataModule: parts plugged in, one eval transform, a new source in one file.

* MedMNIST (1 channel): the ordered loader (feature cache, NCM/kNN/tau-norm fitting) gives the
  test loader's tensors, normalised with 1-channel statistics (before the redesign it fell back
  to the base's 3-channel ImageNet eval transform).
* No DataModule subclass overrides the base's setup, split, loader, resume or fingerprint
  machinery: sources plug a split planner, a task dataset factory and an image store in.
* A new single-label source is one class (here, in this file): it trains through the CLI with
  ``--data.class_path`` and check-data's discovery of the built-in sources keeps working.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medmetric.datamodules.base import ImageClassificationDataModule
from medmetric.datamodules.medmnist import MedMNISTDataModule
from medmetric.datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD
from medmetric.experiments.check_data import check, datamodule_classes

# --- MedMNIST: every eval path sees the same tensors ---------------------------------------


def write_npz(path: Path, n: int = 12, size: int = 28, seed: int = 0) -> Path:
    """A MedMNIST-format npz: gray (N, size, size) uint8 images, labels (N, 1) in {0, 1}."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


def batches(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_medmnist_ordered_loader_gives_the_test_loaders_tensors(tmp_path, in_chans):
    npz = write_npz(tmp_path / "pneumoniamnist.npz")
    dm = MedMNISTDataModule(npz_path=str(npz), in_chans=in_chans, image_size=28, batch_size=4, num_workers=0)
    dm.setup("fit")
    ordered_x, ordered_y = batches(dm.ordered_dataloader("test", sharded=False))
    test_x, test_y = batches(dm.test_dataloader())
    assert ordered_x.shape == (12, in_chans, 28, 28)
    assert torch.equal(ordered_x, test_x) and torch.equal(ordered_y, test_y)
    # independent reference: ImageNet statistics, averaged over the channels for 1 channel
    raw = np.load(npz)["test_images"].astype(np.float64) / 255.0
    mean = np.full(in_chans, np.mean(IMAGENET_MEAN)) if in_chans == 1 else np.asarray(IMAGENET_MEAN)
    std = np.full(in_chans, np.mean(IMAGENET_STD)) if in_chans == 1 else np.asarray(IMAGENET_STD)
    expected = (raw[:, None] - mean[None, :, None, None]) / std[None, :, None, None]
    np.testing.assert_allclose(ordered_x.numpy(), expected, atol=1e-5)
    for split in ("train", "val"):  # the other ordered splits use the same eval transform
        x, _ = batches(dm.ordered_dataloader(split, sharded=False))
        assert x.shape[1] == in_chans


# --- sources plug parts in; they do not override the machinery ------------------------------

MACHINERY = (
    "setup", "prepare_data", "train_dataloader", "val_dataloader", "test_dataloader", "ordered_dataloader",
    "use_features", "state_dict", "load_state_dict", "class_counts", "num_train_images", "split_sha256",
    "fingerprint", "num_classes", "skipped_images", "_indexed_table", "_new_split", "_saved_split",
    "_eval_loader", "_loader_kwargs", "_derive_batch_size", "_check_every_class_in_every_split",
)


def all_datamodule_classes() -> list[type]:
    """Every subclass of the base defined in medmetric.datamodules (abstract ones included)."""
    import importlib
    import pkgutil

    from medmetric import datamodules

    found = set()
    for info in pkgutil.iter_modules(datamodules.__path__):
        module = importlib.import_module(f"medmetric.datamodules.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, ImageClassificationDataModule) and cls is not ImageClassificationDataModule:
                found.add(cls)
    return sorted(found, key=lambda c: c.__qualname__)


def test_no_datamodule_overrides_the_base_machinery():
    classes = all_datamodule_classes()
    names = {c.__name__ for c in classes}
    assert {"HAM10000DataModule", "ISIC2019DataModule", "ChestXray14DataModule", "MedMNISTDataModule",
            "KimiaPath24DataModule", "PatchFolderDataModule", "PatchCSVDataModule"} <= names
    overrides = sorted(
        f"{cls.__name__}.{name}" for cls in classes for name in MACHINERY
        if inspect.getattr_static(cls, name) is not inspect.getattr_static(ImageClassificationDataModule, name)
    )
    assert overrides == [], f"plug a split_planner / task / image_store in instead of overriding: {overrides}"


# --- a new source in one file ----------------------------------------------------------------

TOY_CLASSES = ("round", "square", "stripe")


class ToyCSVDataModule(ImageClassificationDataModule):
    """A new single-label source: ``labels.csv`` (file, diagnosis, patient) + ``pics/<file>``.

    Only the source-specific members: the class names and the index. Split, checks, datasets,
    samplers, loaders, resume state and fingerprint are the base's.
    """

    group_key = "patient"

    @property
    def class_names(self) -> list[str]:
        return list(TOY_CLASSES)

    def read_index(self) -> pd.DataFrame:
        meta = pd.read_csv(self.data_dir / "labels.csv", dtype=str)
        return pd.DataFrame({
            "image_id": meta["file"], "path": [str(self.data_dir / "pics" / f) for f in meta["file"]],
            "label": meta["diagnosis"], "group": meta["patient"],
        })


def write_toy_source(root: Path, per_class: int = 24, seed: int = 0) -> Path:
    """Generated 40 px RGB images of three shapes, two images per patient."""
    rng = np.random.default_rng(seed)
    (root / "pics").mkdir(parents=True)
    yy, xx = np.mgrid[:40, :40]
    shapes = {"round": (yy - 20) ** 2 + (xx - 20) ** 2 < 150, "square": (abs(yy - 20) < 10) & (abs(xx - 20) < 10),
              "stripe": (xx // 5) % 2 == 0}
    rows = []
    for c, name in enumerate(TOY_CLASSES):
        for i in range(per_class):
            pixels = rng.integers(0, 60, (40, 40, 3), dtype=np.uint8)
            pixels[shapes[name]] = 200
            file = f"{name}_{i:03d}.png"
            Image.fromarray(pixels).save(root / "pics" / file)
            rows.append((file, name, f"p{c}_{i // 2:03d}"))
    pd.DataFrame(rows, columns=["file", "diagnosis", "patient"]).to_csv(root / "labels.csv", index=False)
    return root


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return write_toy_source(tmp_path_factory.mktemp("toy") / "toy")


def test_a_new_source_is_checked_like_the_built_in_ones(toy_root):
    dm = ToyCSVDataModule(str(toy_root), image_size=32, batch_size=8, num_workers=0)
    report = check(dm, workers=1)
    assert report.errors == [], report.render()
    assert "patient groups: 36" in report.render()
    dm.setup("fit")
    assert sum(dm.class_counts) + len(dm.datasets["val"]) + len(dm.datasets["test"]) == 72
    assert len(dm.fingerprint()) == 64 and len(dm.split_sha256()) == 64
    # check-data's discovery still lists every built-in source (and not this test's class)
    found = datamodule_classes()
    assert {"ham10000", "isic2019", "chestxray14", "medmnist", "kimiapath24", "patchfolder", "patchcsv"} <= set(found)
    assert ToyCSVDataModule not in found.values()


@pytest.mark.slow
def test_a_new_source_trains_stage1_through_the_cli(toy_root, tmp_path, monkeypatch):
    from medmetric.experiments.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    main([
        "fit", "--config", "experiments/ham10000/stage1.yaml",
        f"--data.class_path=tests.{Path(__file__).stem}.ToyCSVDataModule", f"--allow_class_paths=tests.{Path(__file__).stem}",
        f"--data.data_dir={toy_root}", "--data.image_size=32", "--data.batch_size=12", "--data.m_per_class=4",
        "--data.preload=false", "--model.backbone=test_resnet", "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2", "--trainer.log_every_n_steps=1", "--wandb=disabled",
        f"--runs_dir={tmp_path / 'runs'}", "--experiment=toy",
    ])
    manifest = json.loads((tmp_path / "runs" / "toy" / "handoff.json").read_text())
    assert manifest["class_names"] == list(TOY_CLASSES)
    split = pd.read_csv(tmp_path / "runs" / "toy" / "split.csv")
    assert len(split) == 72 and set(split["split"]) == {"train", "val", "test"}
    assert split.groupby("group")["split"].nunique().max() == 1  # a patient stays in one split
