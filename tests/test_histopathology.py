"""Histopathology sources: Kimia Path24 (RGB folders and HDF5), patch folders, patch CSV; preset."""

from __future__ import annotations

import albumentations as A
import h5py
import numpy as np
import pandas as pd
import pytest

from medmetric.datamodules.histopathology import (
    KIMIA_CLASSES,
    KimiaPath24DataModule,
    PatchCSVDataModule,
    PatchFolderDataModule,
    background_fraction,
    load_patch,
    scan_grid,
)
from medmetric.datamodules.images import load_rgb
from medmetric.datamodules.synthetic_histopathology import (
    write_kimia_hdf5,
    write_kimia_rgb,
    write_patch_folders,
)
from medmetric.datamodules.transforms import PRESETS

SMALL = {"image_size": 32, "batch_size": 8, "num_workers": 0}


@pytest.fixture(scope="module")
def kimia_rgb(tmp_path_factory):
    return write_kimia_rgb(tmp_path_factory.mktemp("kimia") / "rgb", n_train=8, n_test=3, patch_size=24)


@pytest.fixture(scope="module")
def kimia_h5(tmp_path_factory):
    return write_kimia_hdf5(tmp_path_factory.mktemp("kimia") / "kimia.h5", scan_patches=(3, 4), n_test=2, patch_size=16)


def test_kimia_rgb_keeps_the_official_test_set_and_carves_val_from_training(kimia_rgb):
    dm = KimiaPath24DataModule(str(kimia_rgb), **SMALL)
    dm.setup()
    table = dm.table
    assert dm.class_names == [f"s{k}" for k in range(24)]
    from_testing = table["path"].str.contains("/Testing/")
    assert (table.loc[from_testing, "split"] == "test").all() and from_testing.sum() == 24 * 3
    assert set(table.loc[~from_testing, "split"]) == {"train", "val"}
    assert (~from_testing).sum() == 24 * 8
    # labels are the scan folders
    assert (table["label"] == table["path"].map(lambda p: p.split("/")[-2])).all()
    image, target = dm.datasets["test"][0]
    assert tuple(image.shape) == (3, 32, 32) and dm.class_names[int(target)] == dm.table.query("split == 'test'")["label"].iloc[0]


def test_kimia_hdf5_cuts_training_patches_from_scans_and_reads_lazily(kimia_h5):
    dm = KimiaPath24DataModule(str(kimia_h5), patch_size=16, **SMALL)
    dm.setup()
    table = dm.table
    test = table[table["split"] == "test"]
    train = table[table["split"] != "test"]
    assert len(test) == 24 * 2
    assert len(train) == 24 * (3 * 4 - 2)  # the two whitened test regions are skipped as background
    with h5py.File(kimia_h5, "r") as h5:
        targets = h5["test_data/targets"][()]
        for i in (0, 17, 47):
            row = test[test["image_id"] == f"test/{i:05d}"].iloc[0]
            assert row["label"] == f"s{targets[i]}"
            np.testing.assert_array_equal(load_patch(row["path"]), h5["test_data/patches"][i])
        row = train[train["label"] == "s5"].iloc[0]
        y, x = (int(v) for v in row["path"].rsplit("@", 1)[1].split(",")[:2])
        np.testing.assert_array_equal(load_patch(row["path"]), h5["scan5/data"][y : y + 16, x : x + 16])
    assert set(train["label"]) == set(KIMIA_CLASSES)


def test_kimia_hdf5_stride_and_grid(kimia_h5):
    assert scan_grid(48, 64, 16, 16) == [(y, x) for y in (0, 16, 32) for x in (0, 16, 32, 48)]
    assert len(scan_grid(48, 64, 16, 8)) == 5 * 7
    table = KimiaPath24DataModule(str(kimia_h5), patch_size=16, stride=8, max_background=0.99).read_index()
    train = table[table["split"] == "train"]
    # (48-16)/8+1 = 5 rows, (64-16)/8+1 = 7 columns; the whitened test squares x in [0, 32) of the
    # first row hold three all-white grid positions (x = 0, 8, 16), skipped as background
    assert train.groupby("label").size().eq(5 * 7 - 3).all()
    white = np.full((4, 4, 3), 255, np.uint8)
    assert background_fraction(white) == 1.0 and background_fraction(white // 2) == 0.0


def test_kimia_rejects_a_folder_without_the_layout(tmp_path):
    (tmp_path / "Training").mkdir()
    with pytest.raises(FileNotFoundError, match="Testing"):
        KimiaPath24DataModule(str(tmp_path), **SMALL).read_index()
    write_patch_folders(tmp_path / "x" / "Training", ["tumour"], per_class=1)
    (tmp_path / "x" / "Test").mkdir()
    with pytest.raises(ValueError, match="not a Kimia Path24 class"):
        KimiaPath24DataModule(str(tmp_path / "x"), **SMALL).read_index()


def test_patch_folders_with_slide_groups(tmp_path):
    root = write_patch_folders(tmp_path / "patches", ["adipose", "stroma", "tumour"], per_class=12, patch_size=16)
    for folder in root.iterdir():  # four slides per class, three patches each
        for i, image in enumerate(sorted(folder.iterdir())):
            image.rename(folder / f"slide{folder.name}{i % 4}_{image.name}")
    dm = PatchFolderDataModule(str(root), group_pattern=r"^(slide\w+?\d)_", val_fraction=0.25, test_fraction=0.25, **SMALL)
    dm.setup()
    assert dm.class_names == ["adipose", "stroma", "tumour"]
    per_group = dm.table.groupby("group")["split"].nunique()
    assert len(per_group) == 12 and (per_group == 1).all()
    assert len(dm.table) == 36
    with pytest.raises(ValueError, match="group_pattern"):
        PatchFolderDataModule(str(root), group_pattern=r"^(nomatch)", **SMALL).read_index()


def test_patch_folders_with_given_train_test(tmp_path):
    write_patch_folders(tmp_path / "p" / "train", ["a", "b"], per_class=8, patch_size=16)
    write_patch_folders(tmp_path / "p" / "test", ["a", "b"], per_class=3, patch_size=16, seed=1)
    dm = PatchFolderDataModule(str(tmp_path / "p"), **SMALL)
    dm.setup()
    is_test = dm.table["image_id"].str.startswith("test/")
    assert (dm.table.loc[is_test, "split"] == "test").all() and is_test.sum() == 6
    assert set(dm.table.loc[~is_test, "split"]) == {"train", "val"}


def test_patch_csv_groups_by_slide_and_checks_columns(tmp_path):
    root = write_patch_folders(tmp_path / "p", ["benign", "malignant"], per_class=12, patch_size=16)
    rows = [(f"{c}/{p.name}", c, f"{c}-slide{i % 4}") for c in ("benign", "malignant")
            for i, p in enumerate(sorted((root / c).iterdir()))]
    pd.DataFrame(rows, columns=["path", "label", "slide_id"]).to_csv(root / "patches.csv", index=False)
    dm = PatchCSVDataModule(str(root), val_fraction=0.25, test_fraction=0.25, **SMALL)
    dm.setup()
    assert (dm.table.groupby("group")["split"].nunique() == 1).all()
    assert set(dm.table["group"]) == {f"{c}-slide{i}" for c in ("benign", "malignant") for i in range(4)}
    np.testing.assert_array_equal(load_patch(dm.table["path"].iloc[0]), load_rgb(root / rows[0][0]))

    pd.DataFrame({"file": ["x.png"], "label": ["a"]}).to_csv(root / "bad.csv", index=False)
    with pytest.raises(ValueError, match=r"bad.csv: missing column\(s\) \['path'\]"):
        PatchCSVDataModule(str(root), csv_file="bad.csv", **SMALL).read_index()
    pd.DataFrame({"path": ["benign/a.png"], "label": ["a"], "split": ["validation"]}).to_csv(root / "bad2.csv", index=False)
    with pytest.raises(ValueError, match="bad2.csv, row 2, column 'split'"):
        PatchCSVDataModule(str(root), csv_file="bad2.csv", **SMALL).read_index()
    with pytest.raises(ValueError, match="no column 'patient'"):
        PatchCSVDataModule(str(root), group_column="patient", **SMALL).read_index()


def test_histopathology_preset_is_orientation_and_stain_augmentation_only():
    transforms = PRESETS["histopathology"](32)
    kinds = {type(t) for t in transforms}
    assert {A.HorizontalFlip, A.VerticalFlip, A.RandomRotate90, A.HEStain} <= kinds
    assert A.InvertImg not in kinds and not any("Invert" in t.__name__ or "Solarize" in t.__name__ for t in kinds)
