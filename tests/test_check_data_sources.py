"""``medmetric check-data`` on every data source, each on generated data in its real format.

Every printed count is compared with a count made here from the generated files themselves
(CSV rows, class folders, npz arrays, the HDF5 targets), not from the DataModule; each new
source also has an error case (exit status 1, the message naming the file).
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from medmetric.datamodules.chest_xray import CHESTXRAY14_LABELS
from medmetric.datamodules.histopathology import KIMIA_CLASSES
from medmetric.datamodules.medmnist import MedMNISTDataModule
from medmetric.datamodules.skin import HAM10000DataModule
from medmetric.datamodules.synthetic import write_chestxray14, write_ham10000, write_isic2019
from medmetric.datamodules.synthetic_histopathology import (
    write_kimia_hdf5,
    write_kimia_rgb,
    write_patch_folders,
)
from medmetric.experiments import check_data

UNSEEN = ["Edema", "Pneumonia", "Emphysema", "Fibrosis"]


def run(capsys, *argv: str) -> tuple[int, str]:
    code = check_data.main([str(a) for a in argv])
    return code, capsys.readouterr().out


def row(out: str, name: str) -> list[int]:
    """The numbers of one row of a printed count table (train, val, test, total)."""
    match = re.search(rf"^{re.escape(name)}\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", out, re.M)
    assert match, f"no row {name!r} in:\n{out}"
    return [int(v) for v in match.groups()]


def fingerprint_in(out: str) -> str:
    return re.search(r"^dataset fingerprint: ([0-9a-f]{64})$", out, re.M).group(1)


# ------------------------------------------------------------------------------- dermoscopy
def test_ham10000_counts_and_fingerprint_match(tmp_path, capsys):
    root = write_ham10000(tmp_path / "ham", n_images=120, seed=3)
    code, out = run(capsys, "--data", "ham10000", "--data_dir", root)
    assert code == 0 and "errors: none" in out
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    for dx, n in meta["dx"].value_counts().items():
        counts = row(out, dx)
        assert counts[3] == n and sum(counts[:3]) == n
    assert row(out, "total")[3] == len(meta)
    assert f"lesion groups: {meta['lesion_id'].nunique()} " in out
    assert "byte-identical duplicates: 0 sets" in out and "unreadable files: 0" in out
    dm = HAM10000DataModule(str(root), num_workers=0)
    dm.setup()
    assert fingerprint_in(out) == dm.fingerprint()  # the fingerprint a training run stores


def test_isic2019_counts_match_the_ground_truth_csv(tmp_path, capsys):
    root = write_isic2019(tmp_path / "isic", n_images=120, seed=4)
    code, out = run(capsys, "--data", "isic2019", "--data_dir", root)
    assert code == 0 and "errors: none" in out
    truth = pd.read_csv(root / "ISIC_2019_Training_GroundTruth.csv").set_index("image")
    labels = truth.idxmax(axis=1).value_counts()
    for name, n in labels.items():
        assert row(out, name)[3] == n
    assert f"images: {len(truth)}   classes:" in out


# ---------------------------------------------------------------------------------- MedMNIST
def write_npz(path: Path, labels: dict[str, np.ndarray], rgb: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, y in labels.items():
        shape = (len(y), 28, 28, 3) if rgb else (len(y), 28, 28)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = y.reshape(len(y), -1).astype(np.uint8)
    arrays["test_images"][0] = arrays["train_images"][5]  # one image in two splits
    np.savez_compressed(path, **arrays)
    return arrays


def test_medmnist_single_label_counts_arrays_and_pixel_duplicates(tmp_path, capsys):
    rng = np.random.default_rng(1)
    labels = {"train": rng.integers(0, 2, 40), "val": rng.integers(0, 2, 9), "test": rng.integers(0, 2, 11)}
    labels["val"][:2], labels["test"][:2] = [0, 1], [0, 1]
    (tmp_path / "pneumoniamnist").mkdir()
    write_npz(tmp_path / "pneumoniamnist" / "pneumoniamnist.npz", labels)
    code, out = run(capsys, "--data", "medmnist", "--data_dir", tmp_path / "pneumoniamnist")
    assert code == 0 and "errors: none" in out
    for k, name in enumerate(["normal", "pneumonia"]):
        expected = [int((labels[s] == k).sum()) for s in ("train", "val", "test")]
        assert row(out, name) == [*expected, sum(expected)]
    assert "train_images uint8 (40, 28, 28), train_labels int64 (40, 1)" in out
    assert "test_images uint8 (11, 28, 28)" in out
    assert "split: official train/val/test of pneumoniamnist.npz" in out
    assert "60 images are references, not files" in out and "byte hashing skipped" in out
    assert "pixel-identical duplicates: 1 sets (2 images), 1 sets across splits" in out
    assert "['train_000005', 'test_000000'] in train+test" in out
    assert "image modes: {'uint8 gray array': 60}" in out and "min 28 x 28, max 28 x 28" in out
    dm = MedMNISTDataModule(str(tmp_path / "pneumoniamnist"))
    dm.setup()
    assert fingerprint_in(out) == dm.fingerprint()


def test_medmnist_multi_label_gives_positives_per_label(tmp_path, capsys):
    rng = np.random.default_rng(2)
    labels = {s: (rng.random((n, 14)) < 0.2).astype(np.int64) for s, n in (("train", 30), ("val", 8), ("test", 10))}
    write_npz(tmp_path / "chestmnist.npz", labels, seed=2)
    code, out = run(capsys, "--data", "medmnist", "--data_dir", tmp_path / "chestmnist.npz")
    assert "labels: 14 (multi-label)" in out and "positive images per label and split:" in out
    for j, name in enumerate(CHESTXRAY14_LABELS):
        expected = [int(labels[s][:, j].sum()) for s in ("train", "val", "test")]
        assert row(out, name) == [*expected, sum(expected)]
    negative = [int((labels[s].sum(1) == 0).sum()) for s in ("train", "val", "test")]
    assert row(out, "No Finding (all negative)") == [*negative, sum(negative)]
    assert row(out, "images") == [30, 8, 10, 48]
    assert code == 0 and "errors: none" in out


def test_medmnist_corrupt_npz_names_the_file(tmp_path, capsys):
    path = tmp_path / "pneumoniamnist.npz"
    write_npz(path, {s: np.array([0, 1] * 5) for s in ("train", "val", "test")})
    path.write_bytes(path.read_bytes()[:300])
    code, out = run(capsys, "--data", "medmnist", "--data_dir", path)
    assert code == 1
    assert re.search(rf"ERROR {re.escape(str(path))}: cannot read the npz .*download it again", out)


# ----------------------------------------------------------------------------- ChestX-ray14
@pytest.fixture(scope="module")
def cxr_root(tmp_path_factory) -> Path:
    return write_chestxray14(tmp_path_factory.mktemp("cxr9") / "cxr", n_patients=40, seed=5)


def cxr_reference(root: Path) -> tuple[pd.DataFrame, set[str]]:
    meta = pd.read_csv(root / "Data_Entry_2017.csv", usecols=["Image Index", "Finding Labels", "Patient ID"])
    test = set((root / "test_list.txt").read_text().split())
    train_val = set((root / "train_val_list.txt").read_text().split())
    meta = meta[meta["Image Index"].isin(test | train_val)]
    return meta, test


def test_chestxray14_positives_per_label_and_official_test(cxr_root, capsys):
    code, out = run(capsys, "--data", "chestxray14", "--data_dir", cxr_root)
    assert code == 0 and "errors: none" in out
    meta, test = cxr_reference(cxr_root)
    in_test = meta["Image Index"].isin(test).to_numpy()
    findings = meta["Finding Labels"].str.split("|")
    assert f"images: {len(meta)}   labels: 14 (multi-label)" in out
    for name in CHESTXRAY14_LABELS:
        has = findings.map(lambda f, n=name: n in f).to_numpy()
        train, val, test_n, total = row(out, name)
        assert (train + val, test_n, total) == (int((has & ~in_test).sum()), int((has & in_test).sum()), int(has.sum()))
    none = (meta["Finding Labels"] == "No Finding").to_numpy()
    train, val, test_n, total = row(out, "No Finding (all negative)")
    assert (train + val, test_n, total) == (int((none & ~in_test).sum()), int((none & in_test).sum()), int(none.sum()))
    assert row(out, "images")[2] == len(test)
    patients = meta["Patient ID"].astype(str)
    assert f"patient groups: {patients.nunique()} " in out and "patient groups spanning splits: 0" in out
    assert f"image modes: {{'L': {len(meta)}}}" in out
    assert "official test_list.txt is test" in out


def test_chestxray14_gzsl_counts_the_held_out_images(cxr_root, capsys):
    code, out = run(capsys, "--data", "chestxray14", "--data_dir", cxr_root, f"--data.unseen_labels={UNSEEN}")
    assert code == 0
    meta, test = cxr_reference(cxr_root)
    findings = meta["Finding Labels"].str.split("|")
    only_unseen = findings.map(lambda f: set(f) <= set(UNSEEN)) & (meta["Finding Labels"] != "No Finding")
    held = int((only_unseen & ~meta["Image Index"].isin(test)).sum())
    assert held > 0
    assert f"images with only unseen findings held out of train+val: {held}" in out


def test_chestxray14_missing_image_names_it(cxr_root, tmp_path, capsys):
    import shutil

    root = Path(shutil.copytree(cxr_root, tmp_path / "cxr"))
    victim = sorted(root.glob("images_*/images/*.png"))[3]
    victim.unlink()
    code, out = run(capsys, "--data", "chestxray14", "--data_dir", root)
    assert code == 1
    assert "ERROR 1 of" in out and victim.name in out and "remove the rows" in out


# ---------------------------------------------------------------------------- histopathology
def test_kimia_rgb_counts_match_the_class_folders(tmp_path, capsys):
    root = write_kimia_rgb(tmp_path / "kimia", n_train=4, n_test=2)
    code, out = run(capsys, "--data", "kimiapath24", "--data_dir", root)
    assert code == 0 and "errors: none" in out
    for name in KIMIA_CLASSES:
        n_train = len(list((root / "Training" / name).glob("*.png")))
        n_test = len(list((root / "Testing" / name).glob("*.png")))
        train, val, test, total = row(out, name)
        assert (train + val, test, total) == (n_train, n_test, n_train + n_test)
    assert "official test set kept; val carved from train" in out
    assert "image modes: {'RGB': 144}" in out


def test_kimia_rgb_unreadable_patch_names_the_file(tmp_path, capsys):
    root = write_kimia_rgb(tmp_path / "kimia", n_train=4, n_test=2)
    bad = sorted((root / "Training" / "s3").glob("*.png"))[1]
    bad.write_bytes(bad.read_bytes()[:60])
    code, out = run(capsys, "--data", "kimiapath24", "--data_dir", root)
    assert code == 1
    assert f"unreadable files: 1\n  train/s3/{bad.name}: {bad}:" in out
    assert f"ERROR 1 unreadable images (first: {bad}" in out


def test_kimia_hdf5_decodes_references_and_counts_the_h5(tmp_path, capsys):
    path = write_kimia_hdf5(tmp_path / "kimia" / "kimia.h5", scan_patches=(4, 4), n_test=2, patch_size=16, n_classes=24)
    code, out = run(capsys, "--data", "kimiapath24", "--data_dir", path.parent, "--data.patch_size=16", "--data.group_block=1")
    assert code == 0 and "errors: none" in out
    with h5py.File(path) as h5:
        targets = h5["test_data/targets"][()]
    for k, name in enumerate(KIMIA_CLASSES):
        train, val, test, total = row(out, name)
        assert (train + val, test) == (4 * 4 - 2, int((targets == k).sum()))
    n = 24 * 16
    assert f"{n} images are references, not files (e.g. {path}::scan0/data@" in out and "byte hashing skipped" in out
    assert "pixel-identical duplicates: 0 sets" in out and "unreadable images: 0" in out
    assert f"image modes: {{'uint8 3-channel array': {n}}}" in out and "min 16 x 16, max 16 x 16" in out
    assert re.search(r"^dataset fingerprint: [0-9a-f]{64}$", out, re.M)  # HDF5 references are fingerprinted too


def test_kimia_hdf5_damaged_file_names_it(tmp_path, capsys):
    path = write_kimia_hdf5(tmp_path / "kimia" / "kimia.h5", scan_patches=(2, 2), n_test=1, patch_size=16, n_classes=24)
    path.write_bytes(path.read_bytes()[:2000])
    code, out = run(capsys, "--data", "kimiapath24", "--data_dir", path.parent, "--data.patch_size=16")
    assert code == 1
    assert f"ERROR {path}: cannot open the HDF5 file" in out


def test_patch_folder_counts_match_the_folders(tmp_path, capsys):
    root = write_patch_folders(tmp_path / "patches", ["benign", "tumour", "stroma"], per_class=10, patch_size=16)
    code, out = run(capsys, "--data", "patchfolder", "--data_dir", root)
    assert code == 0 and "errors: none" in out
    for name in ("benign", "tumour", "stroma"):
        assert row(out, name)[3] == len(list((root / name).glob("*.png")))
    assert row(out, "total")[3] == 30


def test_patch_csv_with_a_test_split_and_a_missing_hdf5_file(tmp_path, capsys):
    root = write_patch_folders(tmp_path / "patches", ["a", "b"], per_class=12, patch_size=16)
    files = sorted(root.glob("*/*.png"))
    table = pd.DataFrame({
        "path": [str(f.relative_to(root)) for f in files],
        "label": [f.parent.name for f in files],
        "slide_id": [f"{f.parent.name}{i // 2}" for i, f in enumerate(files)],
        "split": ["test" if (i // 2) % 3 == 0 else "train" for i in range(len(files))],  # slide-wise
    })
    table.to_csv(root / "patches.csv", index=False)
    code, out = run(capsys, "--data", "patchcsv", "--data_dir", root)
    assert code == 0 and "errors: none" in out
    for name in ("a", "b"):
        rows = table[table["label"] == name]
        train, val, test, total = row(out, name)
        assert (train + val, test, total) == (int((rows["split"] == "train").sum()), int((rows["split"] == "test").sum()), len(rows))
    assert f"slide groups: {table['slide_id'].nunique()} " in out

    missing = root / "gone.h5"
    pd.concat([table, pd.DataFrame([{"path": f"{missing}::patches[0]", "label": "a", "slide_id": "z", "split": "train"}])]).to_csv(
        root / "patches.csv", index=False)
    code, out = run(capsys, "--data", "patchcsv", "--data_dir", root)
    assert code == 1 and f"{missing}::patches[0]" in out and "are missing" in out
