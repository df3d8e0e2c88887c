"""MedMNIST npz loading on generated files (binary, multi-label, RGB), official splits kept,
and a real-data two-stage CLI run on ../shared/data/pneumoniamnist (skipped when absent)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from medmetric.datamodules.chest_xray import CHESTXRAY14_LABELS
from medmetric.datamodules.medmnist import MedMNISTDataModule
from medmetric.experiments.cli import main
from tests.conftest import REPO

REAL_PNEUMONIAMNIST = REPO.parent / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist.npz"
SIZES = {"train": 24, "val": 8, "test": 10}


def write_npz(path, label_width: int = 1, num_classes: int = 2, rgb: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in SIZES.items():
        shape = (n, 28, 28, 3) if rgb else (n, 28, 28)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        if label_width == 1:
            labels = np.arange(n) % num_classes  # every class in every split
        else:
            labels = (rng.random((n, label_width)) < 0.3).astype(np.uint8)
        arrays[f"{split}_labels"] = labels.reshape(n, -1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def build(**kwargs) -> MedMNISTDataModule:
    dm = MedMNISTDataModule(image_size=32, batch_size=8, **kwargs)
    dm.prepare_data()
    dm.setup()
    return dm


def test_binary_npz_keeps_official_splits(tmp_path):
    arrays = write_npz(tmp_path / "pneumoniamnist" / "pneumoniamnist.npz")
    dm = build(data_dir=str(tmp_path / "pneumoniamnist"), split_file=str(tmp_path / "split.csv"))
    assert dm.class_names == ["normal", "pneumonia"] and not dm.multilabel
    for split, n in SIZES.items():
        assert len(dm.datasets[split]) == n
        assert dm.datasets[split].targets.tolist() == arrays[f"{split}_labels"][:, 0].tolist()
    assert dm.class_counts == np.bincount(arrays["train_labels"][:, 0]).tolist()
    image, target = dm.datasets["val"][3]
    assert image.shape == (3, 32, 32) and target.dtype == torch.int64
    saved = pd.read_csv(tmp_path / "split.csv")
    assert saved["split"].value_counts().to_dict() == SIZES
    one = build(npz_path=str(tmp_path / "pneumoniamnist" / "pneumoniamnist.npz"), in_chans=1)
    assert one.datasets["train"][0][0].shape == (1, 32, 32)
    assert one.split_sha256() == dm.split_sha256()


def test_multilabel_npz_gives_multi_hot_targets(tmp_path):
    arrays = write_npz(tmp_path / "chestmnist.npz", label_width=14)
    dm = build(data_dir=str(tmp_path / "chestmnist.npz"))
    assert dm.multilabel and dm.class_names == list(CHESTXRAY14_LABELS)
    train = dm.datasets["train"]
    assert train.targets.dtype == torch.float32
    assert np.array_equal(train.targets.numpy(), arrays["train_labels"].astype(np.float32))
    assert dm.class_counts == arrays["train_labels"].sum(0).tolist() and dm.num_train_images == SIZES["train"]
    image, target = train[0]
    assert image.shape == (3, 32, 32) and target.shape == (14,)
    with pytest.raises(ValueError, match="multi-label"):
        MedMNISTDataModule(data_dir=str(tmp_path / "chestmnist.npz"), sampler="class_balanced")


def test_unknown_set_rgb_and_bad_files(tmp_path):
    write_npz(tmp_path / "a" / "organamnist.npz", num_classes=4, rgb=True)
    dm = build(data_dir=str(tmp_path / "a"))
    assert dm.class_names == ["class_0", "class_1", "class_2", "class_3"]
    assert dm.datasets["train"][0][0].shape == (3, 32, 32)
    write_npz(tmp_path / "a" / "other.npz")
    with pytest.raises(FileNotFoundError, match="data.npz_path"):
        MedMNISTDataModule(data_dir=str(tmp_path / "a"))
    np.savez(tmp_path / "broken.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="missing arrays.*train_labels"):
        MedMNISTDataModule(npz_path=str(tmp_path / "broken.npz"))
    with pytest.raises(ValueError, match="data.class_names"):
        MedMNISTDataModule(npz_path=str(tmp_path / "a" / "other.npz"), class_names=["x", "y", "z"])


@pytest.mark.real_data
@pytest.mark.slow
def test_two_stages_on_real_pneumoniamnist(tmp_path):
    if not REAL_PNEUMONIAMNIST.is_file():
        pytest.skip(f"real PneumoniaMNIST not found at {REAL_PNEUMONIAMNIST} (../shared/data/pneumoniamnist)")
    small = [
        f"--data.data_dir={REAL_PNEUMONIAMNIST.parent}", f"--runs_dir={tmp_path}", "--experiment=real", "--wandb=disabled",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2",
    ]
    main(["fit", "--config", "experiments/pneumoniamnist/stage1.yaml", *small, "--model.backbone=test_resnet"])
    main(["fit", "--config", "experiments/pneumoniamnist/stage2.yaml", *small])
    split = pd.read_csv(tmp_path / "real" / "split.csv")
    with np.load(REAL_PNEUMONIAMNIST) as npz:
        sizes = {s: len(npz[f"{s}_labels"]) for s in ("train", "val", "test")}
        train_counts = np.bincount(npz["train_labels"][:, 0]).tolist()
    assert split["split"].value_counts().to_dict() == sizes
    manifest = json.loads((tmp_path / "real" / "handoff.json").read_text())
    assert manifest["class_counts"] == train_counts
    (stage2,) = (tmp_path / "real" / "stage2").iterdir()
    results = json.loads((stage2 / "results.json").read_text())
    assert results["class_names"] == ["normal", "pneumonia"]
    assert 0.0 <= results["metrics"]["macro_auroc"] <= 1.0
