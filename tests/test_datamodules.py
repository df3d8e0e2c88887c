"""The HAM10000 / ISIC 2019 DataModules on tiny synthetic data in the real on-disk formats.

Expected values are recomputed from the CSV files with pandas (labels, lesion groups, class
counts), never read back from the DataModule's own tables.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medmetric.datamodules.images import ImageReadError
from medmetric.datamodules.skin import (
    HAM10000_CLASSES,
    ISIC2019_CLASSES,
    HAM10000DataModule,
    ISIC2019DataModule,
)
from tests.conftest import require_real_ham10000

SPLITS = ("train", "val", "test")
HAM_META = "HAM10000_metadata.csv"
ISIC_GT = "ISIC_2019_Training_GroundTruth.csv"
ISIC_META = "ISIC_2019_Training_Metadata.csv"

FAST = {"image_size": 32, "num_workers": 0, "batch_size": 16}


def ham(root, **kwargs) -> HAM10000DataModule:
    return HAM10000DataModule(str(root), **{**FAST, **kwargs})


def isic(root, **kwargs) -> ISIC2019DataModule:
    return ISIC2019DataModule(str(root), **{**FAST, **kwargs})


def read_str_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


# =============================================================== HAM10000, happy path


@pytest.fixture(scope="module")
def ham_dm(ham_root, tmp_path_factory):
    """A preloaded HAM10000 DataModule whose split was written by prepare_data()."""
    split_file = tmp_path_factory.mktemp("ham_split") / "runs" / "split.csv"
    dm = ham(ham_root, split_file=str(split_file), preload=True)
    dm.prepare_data()
    assert split_file.is_file()
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def ham_meta(ham_root) -> pd.DataFrame:
    return read_str_csv(ham_root / HAM_META)


@pytest.fixture(scope="module")
def ham_split(ham_dm) -> pd.DataFrame:
    return read_str_csv(ham_dm.split_file)


def test_ham_split_file_lists_every_image_once_with_its_lesion_and_label(ham_split, ham_meta):
    assert list(ham_split.columns) == ["image_id", "group", "label", "split"]
    assert not ham_split["image_id"].duplicated().any()
    assert sorted(ham_split["image_id"]) == sorted(ham_meta["image_id"])
    assert set(ham_split["split"]) == set(SPLITS)
    merged = ham_split.merge(ham_meta, on="image_id", validate="one_to_one")
    assert (merged["group"] == merged["lesion_id"]).all()
    assert (merged["label"] == merged["dx"]).all()


def test_ham_no_lesion_in_two_splits(ham_split, ham_meta):
    merged = ham_meta.merge(ham_split[["image_id", "split"]], on="image_id")
    splits_per_lesion = merged.groupby("lesion_id")["split"].nunique()
    assert splits_per_lesion.max() == 1
    assert (merged.groupby("lesion_id").size() > 1).any()  # the check has multi-image lesions


def test_ham_every_class_in_every_split(ham_split):
    counts = pd.crosstab(ham_split["label"], ham_split["split"])
    assert sorted(counts.index) == sorted(HAM10000_CLASSES)
    assert (counts[list(SPLITS)] > 0).all().all()


def test_ham_class_counts_are_training_label_counts(ham_dm, ham_split):
    assert ham_dm.class_names == list(HAM10000_CLASSES)
    assert ham_dm.num_classes == 7
    train = ham_split[ham_split["split"] == "train"]
    expected = train["label"].value_counts().reindex(HAM10000_CLASSES, fill_value=0).tolist()
    assert ham_dm.class_counts == expected
    assert sum(expected) == len(ham_dm.datasets["train"])


def test_ham_dataset_sizes_match_split_file(ham_dm, ham_split):
    sizes = ham_split["split"].value_counts()
    for split in SPLITS:
        assert len(ham_dm.datasets[split]) == sizes[split]


def test_ham_split_file_is_reused_even_with_other_split_settings(ham_dm, ham_root):
    before = ham_dm.split_file.read_bytes()
    assignment = dict(zip(ham_dm.table["image_id"], ham_dm.table["split"], strict=True))

    # the other settings do give another split when no file is saved ...
    fresh = ham(ham_root, split_seed=7, val_fraction=0.25)
    fresh.setup()
    fresh_assignment = dict(zip(fresh.table["image_id"], fresh.table["split"], strict=True))
    assert fresh_assignment != assignment

    # ... but the saved file wins
    again = ham(ham_root, split_file=str(ham_dm.split_file), split_seed=7, val_fraction=0.25)
    again.prepare_data()
    again.setup()
    assert dict(zip(again.table["image_id"], again.table["split"], strict=True)) == assignment
    assert again.split_sha256() == ham_dm.split_sha256()
    assert ham_dm.split_file.read_bytes() == before  # not rewritten


def test_ham_train_batch_shapes_and_types(ham_dm):
    x, y = next(iter(ham_dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32)
    assert x.dtype == torch.float32
    assert y.dtype == torch.long
    assert y.shape == (16,)
    assert 0 <= int(y.min()) and int(y.max()) < 7


def test_ham_eval_loaders_cover_each_split_once(ham_dm, ham_split):
    loaders = {"val": ham_dm.val_dataloader, "test": ham_dm.test_dataloader}
    classes = list(HAM10000_CLASSES)
    for split, make_loader in loaders.items():
        batches = list(make_loader())
        targets = torch.cat([y for _, y in batches]).tolist()
        images = torch.cat([x for x, _ in batches])
        expected = ham_split.loc[ham_split["split"] == split, "label"].tolist()
        assert len(targets) == len(expected)  # no drop_last, nothing twice
        assert Counter(classes[t] for t in targets) == Counter(expected)
        assert images.shape == (len(expected), 3, 32, 32)
        again = torch.cat([x for x, _ in make_loader()])
        assert torch.equal(images, again)  # eval: fixed order, no augmentation
    total = sum(len(ham_dm.datasets[s]) for s in SPLITS)
    assert total == len(ham_split)


def test_ham_instance_sampler_draws_each_training_image_at_most_once(ham_dm):
    loader = ham_dm.train_dataloader()
    n_train = len(ham_dm.datasets["train"])
    targets = torch.cat([y for _, y in loader])
    assert len(targets) == (n_train // 16) * 16  # drop_last, one pass
    full = Counter(ham_dm.datasets["train"].targets.tolist())
    drawn = Counter(targets.tolist())
    assert all(drawn[c] <= full[c] for c in drawn)


def test_ham_m_per_class_batches_are_p_classes_times_m(ham_dm, ham_root):
    dm = ham(ham_root, split_file=str(ham_dm.split_file), sampler="m_per_class", m_per_class=4)
    dm.setup()
    loader = dm.train_dataloader()
    n = 0
    for x, y in loader:
        assert x.shape == (16, 3, 32, 32)
        counts = Counter(y.tolist())
        assert len(counts) == 4, counts  # P = 16 / 4 distinct classes
        assert set(counts.values()) == {4}, counts  # M = 4 images each
        n += 1
        if n == 3:
            break
    assert n == 3


def test_ham_class_balanced_batches_over_sample_rare_classes(ham_dm, ham_root):
    dm = ham(ham_root, split_file=str(ham_dm.split_file), sampler="class_balanced")
    dm.setup()
    targets = []
    for i, (x, y) in enumerate(dm.train_dataloader()):
        assert x.shape == (16, 3, 32, 32)
        assert y.dtype == torch.long
        targets += y.tolist()
        if i == 5:
            break
    counts = Counter(targets)
    assert set(counts) <= set(range(7))
    nv = HAM10000_CLASSES.index("nv")
    share_nv_in_train = dm.class_counts[nv] / sum(dm.class_counts)
    assert share_nv_in_train > 0.6
    assert counts[nv] / len(targets) < 0.4  # ~1/7 expected when balanced
    assert len(counts) >= 5


def test_ham_images_in_the_original_part_1_and_part_2_folders(ham_copy):
    images = sorted((ham_copy / "images").glob("*.jpg"))
    part1, part2 = ham_copy / "HAM10000_images_part_1", ham_copy / "HAM10000_images_part_2"
    part1.mkdir()
    part2.mkdir()
    for i, path in enumerate(images):
        shutil.move(str(path), str((part1 if i < len(images) // 2 else part2) / path.name))
    (ham_copy / "images").rmdir()
    dm = ham(ham_copy)
    dm.setup()
    paths = dict(zip(dm.table["image_id"], dm.table["path"], strict=True))
    assert len(paths) == len(images)
    for i, path in enumerate(images):
        expected = (part1 if i < len(images) // 2 else part2) / path.name
        assert Path(paths[path.stem]) == expected
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape[1:] == (3, 32, 32)


# =============================================================== ISIC 2019, happy path


@pytest.fixture(scope="module")
def isic_dm(isic_root):
    dm = isic(isic_root)
    dm.setup()
    return dm


def test_isic_class_names_without_unk(isic_dm, isic_root):
    truth = read_str_csv(isic_root / ISIC_GT)
    assert "UNK" in truth.columns and (truth["UNK"].astype(float) == 0).all()
    assert isic_dm.class_names == ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
    assert isic_dm.num_classes == 8


def test_isic_labels_are_the_one_hot_column(isic_dm, isic_root):
    truth = read_str_csv(isic_root / ISIC_GT)
    onehot = truth.set_index("image")[list(ISIC2019_CLASSES)].astype(float)
    expected = onehot.idxmax(axis=1)
    table = isic_dm.table.set_index("image_id")
    assert sorted(table.index) == sorted(expected.index)
    assert (table.loc[expected.index, "label"] == expected).all()
    names = isic_dm.class_names
    assert (table["target"].map(lambda t: names[t]) == table["label"]).all()


def test_isic_groups_are_lesions_and_empty_lesion_ids_are_own_groups(isic_dm, isic_root):
    meta = read_str_csv(isic_root / ISIC_META)
    lesion = meta.set_index("image")["lesion_id"]
    group = isic_dm.table.set_index("image_id")["group"]
    empty = lesion.index[lesion == ""]
    assert len(empty) > 0
    for image in lesion.index:
        if lesion[image] == "":
            assert group[image] == image
        else:
            assert group[image] == lesion[image]


def test_isic_same_lesion_never_in_two_splits(isic_dm, isic_root):
    meta = read_str_csv(isic_root / ISIC_META)
    merged = meta.merge(isic_dm.table[["image_id", "split"]], left_on="image", right_on="image_id")
    with_id = merged[merged["lesion_id"] != ""]
    assert (with_id.groupby("lesion_id").size() > 1).any()
    assert with_id.groupby("lesion_id")["split"].nunique().max() == 1
    x, y = next(iter(isic_dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and int(y.max()) < 8


def test_isic_without_metadata_groups_are_images(isic_copy):
    (isic_copy / ISIC_META).unlink()
    dm = isic(isic_copy)
    dm.setup()
    assert (dm.table["group"] == dm.table["image_id"]).all()
    truth = read_str_csv(isic_copy / ISIC_GT)
    assert sorted(dm.table["image_id"]) == sorted(truth["image"])


def test_isic_unk_is_a_class_when_a_row_uses_it(isic_copy):
    truth = read_str_csv(isic_copy / ISIC_GT)
    truth.loc[0, list(ISIC2019_CLASSES)] = "0.0"
    truth.loc[0, "UNK"] = "1.0"
    truth.to_csv(isic_copy / ISIC_GT, index=False)
    assert isic(isic_copy).class_names == [*ISIC2019_CLASSES, "UNK"]


# =============================================================== bad input: files


def test_missing_images_fail_at_setup_naming_them(ham_copy, tmp_path):
    meta = read_str_csv(ham_copy / HAM_META)
    gone = [meta["image_id"].iloc[i] for i in (5, 50, 200)]
    for image_id in gone:
        (ham_copy / "images" / f"{image_id}.jpg").unlink()
    dm = ham(ham_copy)
    with pytest.raises(FileNotFoundError, match=r"3 of 300 images") as err:
        dm.setup()
    message = str(err.value)
    for image_id in gone:
        assert image_id in message
    assert "Put the image files in place or remove their rows" in message
    # prepare_data (run first by the Trainer) refuses too, and writes no split
    split_file = tmp_path / "split.csv"
    with pytest.raises(FileNotFoundError, match=re.escape(gone[0])):
        ham(ham_copy, split_file=str(split_file)).prepare_data()
    assert not split_file.exists()


def corrupt(path: Path, kind: str) -> None:
    if kind == "garbage":
        path.write_bytes(b"this is not a jpeg\x00\xff" * 40)
    else:  # truncated JPEG: the header survives, the pixel data does not
        path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_image_with_preload_fails_at_setup(ham_copy, kind):
    meta = read_str_csv(ham_copy / HAM_META)
    bad = ham_copy / "images" / f"{meta['image_id'].iloc[17]}.jpg"
    corrupt(bad, kind)
    with pytest.raises(ImageReadError, match=re.escape(str(bad))) as err:
        ham(ham_copy, preload=True).setup()
    assert "corrupt" in str(err.value)


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_image_without_preload_fails_when_fetched(ham_copy, kind):
    meta = read_str_csv(ham_copy / HAM_META)
    bad = ham_copy / "images" / f"{meta['image_id'].iloc[17]}.jpg"
    corrupt(bad, kind)
    dm = ham(ham_copy, preload=False)
    dm.setup()  # files exist: the decode error comes when the image is read
    (split,) = [s for s in SPLITS if str(bad) in dm.datasets[s].paths]
    dataset = dm.datasets[split]
    i = dataset.paths.index(str(bad))
    dataset[(i + 1) % len(dataset)]  # its neighbours still load
    with pytest.raises(ImageReadError, match=re.escape(str(bad))):
        dataset[i]


# =============================================================== bad input: HAM CSV


def edit_ham(root: Path, edit) -> Path:
    path = root / HAM_META
    meta = read_str_csv(path)
    meta = edit(meta)
    meta.to_csv(path, index=False)
    return path


def test_ham_metadata_without_dx_column(ham_copy):
    path = edit_ham(ham_copy, lambda m: m.rename(columns={"dx": "diagnosis"}))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['dx'\]") as err:
        ham(ham_copy).setup()
    message = str(err.value)
    assert str(path) in message
    assert "['lesion_id', 'image_id', 'dx']" in message  # the expected columns
    assert "'diagnosis'" in message  # what was found


def test_ham_unknown_dx_names_the_line_and_valid_classes(ham_copy):
    def edit(m):
        m.loc[7, "dx"] = "melanoma"
        return m

    path = edit_ham(ham_copy, edit)
    assert path.read_text().splitlines()[8].split(",")[2] == "melanoma"  # line 9, 1-based
    with pytest.raises(ValueError, match=r"row 9, column 'dx': unknown class 'melanoma'") as err:
        ham(ham_copy).setup()
    assert str(list(HAM10000_CLASSES)) in str(err.value)


def test_ham_empty_dx_names_the_line(ham_copy):
    def edit(m):
        m.loc[12, "dx"] = ""
        return m

    edit_ham(ham_copy, edit)
    with pytest.raises(ValueError, match=r"row 14, column 'dx': empty value"):
        ham(ham_copy).setup()


def test_ham_duplicate_image_id_names_the_line(ham_copy):
    def edit(m):
        m.loc[20, "image_id"] = m.loc[3, "image_id"]
        return m

    meta_id = read_str_csv(ham_copy / HAM_META)["image_id"].iloc[3]
    edit_ham(ham_copy, edit)
    with pytest.raises(ValueError, match=rf"row 22: duplicate image_id '{meta_id}'"):
        ham(ham_copy).setup()


def test_class_without_images_in_a_split_fails_at_setup(ham_copy):
    def keep_two_df_lesions(m):
        df_lesions = m.loc[m["dx"] == "df", "lesion_id"].unique()
        assert len(df_lesions) > 2
        return m[(m["dx"] != "df") | m["lesion_id"].isin(df_lesions[:2])]

    edit_ham(ham_copy, keep_two_df_lesions)
    assert read_str_csv(ham_copy / HAM_META).query("dx == 'df'")["lesion_id"].nunique() == 2
    with pytest.raises(ValueError, match=r"'df' in (train|val|test)") as err:
        ham(ham_copy).setup()
    assert "data.val_fraction" in str(err.value)


# =============================================================== bad input: ISIC CSV


def test_isic_unknown_label_column(isic_copy):
    path = isic_copy / ISIC_GT
    truth = read_str_csv(path)
    truth["XYZ"] = "0.0"
    truth.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"unknown \['XYZ'\]") as err:
        isic(isic_copy).setup()
    assert str(path) in str(err.value)
    assert "expected image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC" in str(err.value)


def test_isic_missing_label_column(isic_copy):
    path = isic_copy / ISIC_GT
    read_str_csv(path).drop(columns=["SCC"]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['SCC'\]") as err:
        isic(isic_copy).setup()
    message = str(err.value)
    assert str(path) in message
    assert str(["image", *ISIC2019_CLASSES]) in message  # expected header


def test_isic_multi_hot_row_names_the_line_and_image(isic_copy):
    path = isic_copy / ISIC_GT
    truth = read_str_csv(path)
    truth.loc[10, ["MEL", "NV"]] = "1.0"
    truth.to_csv(path, index=False)
    image = truth.loc[10, "image"]
    with pytest.raises(ValueError, match=rf"row 12 \(image '{image}'\)") as err:
        isic(isic_copy).setup()
    assert "exactly one 1" in str(err.value)


# =============================================================== bad settings


def test_unknown_sampler_lists_the_valid_ones(ham_root):
    with pytest.raises(ValueError, match=r"unknown sampler 'balanced'") as err:
        ham(ham_root, sampler="balanced")
    for name in ("instance", "m_per_class", "class_balanced"):
        assert f"'{name}'" in str(err.value)


def test_unknown_augment_preset_lists_the_valid_ones(ham_root):
    with pytest.raises(ValueError, match=r"unknown augmentation preset 'ct'") as err:
        ham(ham_root, augment="ct")
    for name in ("dermoscopy", "none"):
        assert f"'{name}'" in str(err.value)


# =============================================================== real data


@pytest.mark.real_data
def test_real_ham10000_split_and_loaders(tmp_path):
    root = require_real_ham10000()
    dm = HAM10000DataModule(
        str(root), image_size=32, preload=False, num_workers=0, batch_size=8,
        split_file=str(tmp_path / "split.csv"),
    )  # fmt: skip
    dm.prepare_data()
    dm.setup()
    split = read_str_csv(tmp_path / "split.csv")
    meta = read_str_csv(root / HAM_META)
    assert len(split) == len(meta) == 8583
    assert sorted(split["label"].unique()) == sorted(HAM10000_CLASSES)
    merged = meta.merge(split[["image_id", "split"]], on="image_id", validate="one_to_one")
    assert merged.groupby("lesion_id")["split"].nunique().max() == 1
    overall = merged["dx"].value_counts(normalize=True)
    per_split = pd.crosstab(merged["dx"], merged["split"], normalize="columns")
    big = merged["dx"].value_counts().loc[lambda s: s > 200].index
    for label in big:
        for s in SPLITS:
            assert abs(per_split.loc[label, s] - overall[label]) <= 0.03, (label, s)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
        assert y.dtype == torch.long and 0 <= int(y.min()) and int(y.max()) < 7
    assert np.isfinite(x.numpy()).all()
