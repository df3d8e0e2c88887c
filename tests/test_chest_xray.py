"""ChestX-ray14 loading on the synthetic release: label parsing, both image layouts, the
official lists, the patient-wise validation split, GZSL hold-out, split reuse, bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from medmetric.datamodules.chest_xray import (
    CHESTXRAY14_LABELS,
    ChestXray14DataModule,
    parse_finding_labels,
)
from medmetric.datamodules.synthetic import write_chestxray14

UNSEEN = ["Edema", "Pneumonia", "Emphysema", "Fibrosis"]


def make(root, **kwargs) -> ChestXray14DataModule:
    dm = ChestXray14DataModule(str(root), image_size=32, num_workers=0, **kwargs)
    dm.prepare_data()
    dm.setup()
    return dm


def split_ids(dm: ChestXray14DataModule, split: str) -> list[str]:
    return [p.rsplit("/", 1)[-1] for p in dm.datasets[split].paths]


def expected_targets(root) -> dict[str, np.ndarray]:
    """Independent parse of the CSV: image -> multi-hot row."""
    csv = pd.read_csv(root / "Data_Entry_2017.csv")
    rows = {}
    for name, text in zip(csv["Image Index"], csv["Finding Labels"], strict=True):
        rows[name] = np.array([float(label in text.split("|")) for label in CHESTXRAY14_LABELS], dtype=np.float32)
    return rows


def test_parse_finding_labels_multi_hot_and_errors(tmp_path):
    findings = pd.Series(["Effusion|Mass", "No Finding", "Hernia"])
    targets = parse_finding_labels(findings, tmp_path / "x.csv")
    assert targets.dtype == np.float32 and targets.shape == (3, 14)
    assert np.flatnonzero(targets[0]).tolist() == [2, 4] and targets[1].sum() == 0 and targets[2, 13] == 1
    with pytest.raises(ValueError, match=r"x\.csv, row 3.*'Pneumonitis'"):
        parse_finding_labels(pd.Series(["Mass", "Pneumonitis"]), tmp_path / "x.csv")
    with pytest.raises(ValueError, match="cannot be combined"):
        parse_finding_labels(pd.Series(["No Finding|Mass"]), tmp_path / "x.csv")


def test_official_lists_patient_split_and_targets(chestxray14_root, tmp_path):
    dm = make(chestxray14_root, split_file=str(tmp_path / "split.csv"), val_fraction=0.2)
    root = chestxray14_root
    test_list = (root / "test_list.txt").read_text().split()
    train_val_list = (root / "train_val_list.txt").read_text().split()
    assert sorted(split_ids(dm, "test")) == sorted(test_list)
    assert sorted(split_ids(dm, "train") + split_ids(dm, "val")) == sorted(train_val_list)
    assert split_ids(dm, "val") and split_ids(dm, "train")
    patient = pd.read_csv(root / "Data_Entry_2017.csv").set_index("Image Index")["Patient ID"]
    patients = {s: set(patient.loc[split_ids(dm, s)]) for s in ("train", "val", "test")}
    assert not patients["train"] & patients["val"] and not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    reference = expected_targets(root)
    for split in ("train", "val", "test"):
        expected = np.stack([reference[i] for i in split_ids(dm, split)])
        assert np.array_equal(dm.datasets[split].targets.numpy(), expected)
    assert dm.class_counts == dm.datasets["train"].targets.sum(0).long().tolist()
    image, target = dm.datasets["train"][0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and target.shape == (14,)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixels = image * std[:, None, None] + mean[:, None, None]  # undo ImageNet normalisation
    assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[0], pixels[2], atol=1e-5)
    # the split file is reused as is, and one that moves a test image is refused
    again = make(root, split_file=str(tmp_path / "split.csv"), val_fraction=0.5)
    assert again.split_sha256() == dm.split_sha256()
    saved = pd.read_csv(tmp_path / "split.csv")
    saved.loc[saved["split"] == "test", "split"] = "train"
    saved.to_csv(tmp_path / "moved.csv", index=False)
    with pytest.raises(ValueError, match="test_list.txt"):
        make(root, split_file=str(tmp_path / "moved.csv"))


def test_flat_layout_16bit_and_one_channel(tmp_path):
    root = write_chestxray14(tmp_path / "flat", n_patients=40, layout="flat", bit_depth=16, min_positives=1, unseen_only=1)
    assert (root / "images").is_dir() and not list(root.glob("images_*"))
    dm = make(root, in_chans=1, val_fraction=0.2)
    image, _ = dm.datasets["test"][0]
    assert image.shape == (1, 32, 32)
    assert image.std() > 0.1  # 16-bit pixels rescaled, not clipped to white


def test_gzsl_holds_unseen_labels_out_of_train_and_val(chestxray14_root):
    dm = make(chestxray14_root, unseen_labels=UNSEEN, val_fraction=0.2)
    plain = make(chestxray14_root, val_fraction=0.2)
    unseen = [CHESTXRAY14_LABELS.index(n) for n in UNSEEN]
    seen = [i for i in range(14) if i not in unseen]
    assert dm.seen_labels == [n for n in CHESTXRAY14_LABELS if n not in UNSEEN]
    reference = expected_targets(chestxray14_root)
    for split in ("train", "val"):
        assert dm.datasets[split].targets[:, unseen].sum() == 0
        kept = set(split_ids(dm, split))
        for name in split_ids(plain, split):  # dropped exactly the images with only unseen findings
            only_unseen = reference[name][unseen].sum() > 0 and reference[name][seen].sum() == 0
            assert (name not in kept) == only_unseen
    assert dm.held_out_unseen_only > 0
    assert dm.datasets["test"].targets[:, unseen].sum() > 0  # test keeps every label
    assert split_ids(dm, "test") == split_ids(plain, "test")
    assert all(dm.class_counts[i] == 0 for i in unseen)
    assert dm.split_sha256() != plain.split_sha256()
    with pytest.raises(ValueError, match="unseen_labels.*Oedema"):
        ChestXray14DataModule(str(chestxray14_root), unseen_labels=["Oedema"])


def test_missing_files_and_lists_fail_early_with_the_path(chestxray14_root, tmp_path):
    root = shutil.copytree(chestxray14_root, tmp_path / "copy")
    victim = sorted(root.glob("images_*/images/*.png"))[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        make(root)
    (root / "test_list.txt").unlink()
    with pytest.raises(FileNotFoundError, match="test_list.txt"):
        make(root)
    with pytest.raises(ValueError, match="data.sampler"):
        ChestXray14DataModule(str(root), sampler="class_balanced")


def test_synthetic_labels_carry_a_learnable_signal(chestxray14_root):
    """Independent of our models: per-label logistic regression on 16 x 16 pooled pixels,
    fitted on train_val and scored on the official test list, clearly beats chance."""
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    reference = expected_targets(chestxray14_root)
    paths = {p.name: p for p in chestxray14_root.glob("images_*/images/*.png")}

    def features(names):
        pixels = np.stack([np.asarray(Image.open(paths[n]), dtype=np.float32) / 255 for n in names])
        return pixels.reshape(len(names), 16, 4, 16, 4).mean(axis=(2, 4)).reshape(len(names), -1)

    train = (chestxray14_root / "train_val_list.txt").read_text().split()
    test = (chestxray14_root / "test_list.txt").read_text().split()
    x_train, x_test = features(train), features(test)
    y_train, y_test = np.stack([reference[n] for n in train]), np.stack([reference[n] for n in test])
    aurocs = []
    for c in range(14):
        model = LogisticRegression(C=1.0, max_iter=2000).fit(x_train, y_train[:, c])
        aurocs.append(roc_auc_score(y_test[:, c], model.decision_function(x_test)))
    assert np.mean(aurocs) > 0.8 and min(aurocs) > 0.6, np.round(aurocs, 2)
