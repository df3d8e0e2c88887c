"""Unit tests of medmetric.datamodules.splits: grouped stratified splitting and the saved split CSV.

Every property is checked against an independent recomputation (naive loops over groups,
pandas crosstabs of the returned assignment, hand-made split files), never against the
implementation's own helpers.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pandas as pd
import pytest

from medmetric.datamodules.splits import (
    SPLIT_COLUMNS,
    check_groups_disjoint,
    grouped_stratified_split,
    read_split_csv,
    write_split_csv,
)

# Groups per class: 7 imbalanced classes, from a dominant one down to classes with 3-4 groups.
GROUPS_PER_CLASS = (300, 120, 60, 25, 8, 4, 3)


def random_data(
    seed: int,
    groups_per_class=GROUPS_PER_CLASS,
    max_group: int = 5,
    mixed_fraction: float = 0.0,
) -> pd.DataFrame:
    """Rows (image_id, group, label): groups of 1..max_group images, shuffled row order.

    With ``mixed_fraction`` > 0 that fraction of images gets a random other label, so some
    groups hold more than one label (the split must still keep them whole).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for c, n_groups in enumerate(groups_per_class):
        for g in range(n_groups):
            for _ in range(int(rng.integers(1, max_group + 1))):
                label = f"c{c}"
                if rng.random() < mixed_fraction:
                    label = f"c{int(rng.integers(len(groups_per_class)))}"
                rows.append((f"G{c}_{g:04d}", label))
    frame = pd.DataFrame(rows, columns=["group", "label"])
    frame = frame.iloc[rng.permutation(len(frame))].reset_index(drop=True)
    frame.insert(0, "image_id", [f"IMG_{i:06d}" for i in range(len(frame))])
    return frame


def split_of(frame: pd.DataFrame, val=0.15, test=0.15, seed=0) -> np.ndarray:
    return grouped_stratified_split(frame["label"], frame["group"], val, test, seed)


# ------------------------------------------------------------------------ grouping


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mixed_fraction", [0.0, 0.1])
def test_no_group_in_two_splits(seed, mixed_fraction):
    frame = random_data(seed, mixed_fraction=mixed_fraction)
    split = split_of(frame, seed=seed)
    assert len(split) == len(frame)
    assert set(split) == {"train", "val", "test"}
    # naive loop: every group's images all carry the same split
    seen: dict[str, str] = {}
    for group, s in zip(frame["group"], split, strict=True):
        assert seen.setdefault(group, s) == s, f"group {group} in {seen[group]} and {s}"
    assert len(seen) == sum(GROUPS_PER_CLASS)


def test_split_aligned_with_rows_of_a_non_default_index():
    """Labels/groups with a shuffled, non-0..n index: result is positional, one per row."""
    frame = random_data(3)
    shuffled = frame.set_index(pd.Index(np.arange(len(frame))[::-1] * 7 + 100))
    split = grouped_stratified_split(shuffled["label"], shuffled["group"], 0.15, 0.15, 3)
    np.testing.assert_array_equal(split, split_of(frame, seed=3))


# ------------------------------------------------------------------- stratification


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(("val", "test"), [(0.15, 0.15), (0.1, 0.2), (0.25, 0.05)])
def test_per_class_fractions_close_to_requested(seed, val, test):
    frame = random_data(seed)
    frame["split"] = split_of(frame, val=val, test=test, seed=seed)
    fractions = pd.crosstab(frame["label"], frame["split"], normalize="index")
    groups = frame.groupby("label")["group"].nunique()
    many = groups.index[groups >= 100]
    assert len(many) == 2  # c0 (300 groups) and c1 (120 groups)
    for label in many:
        assert fractions.loc[label, "test"] == pytest.approx(test, abs=0.03), label
        assert fractions.loc[label, "val"] == pytest.approx(val, abs=0.03), label
        assert fractions.loc[label, "train"] == pytest.approx(1 - val - test, abs=0.03), label
    # over all images, too
    overall = frame["split"].value_counts(normalize=True)
    assert overall["test"] == pytest.approx(test, abs=0.03)
    assert overall["val"] == pytest.approx(val, abs=0.03)


@pytest.mark.parametrize("seed", range(25))
def test_class_with_three_or_more_groups_has_a_group_in_each_split(seed):
    rng = np.random.default_rng(1000 + seed)
    # small classes with 3-5 groups of very uneven sizes (one big group, some singletons)
    frame = random_data(seed, groups_per_class=(80, 30, 3, 3, 4, 5, 2), max_group=5)
    big = frame["group"].isin(rng.choice(frame["group"].unique(), 20, replace=False))
    frame = pd.concat([frame, frame[big].assign(image_id=lambda f: f["image_id"] + "_b")] * 3)
    frame = frame.reset_index(drop=True)
    frame["split"] = split_of(frame, seed=seed)
    for label, part in frame.groupby("label"):
        n_groups = part["group"].nunique()
        splits_with_groups = {s for s in ("train", "val", "test") if (part["split"] == s).any()}
        if n_groups >= 3:
            assert splits_with_groups == {"train", "val", "test"}, (label, n_groups)
        else:
            assert len(splits_with_groups) >= 1


def test_zero_fractions_put_everything_in_train():
    frame = random_data(0)
    assert set(split_of(frame, val=0.0, test=0.0)) == {"train"}


def test_zero_test_fraction_gives_no_test_images():
    frame = random_data(0)
    split = split_of(frame, val=0.2, test=0.0)
    assert "test" not in set(split)
    assert (split == "val").mean() == pytest.approx(0.2, abs=0.03)


# ---------------------------------------------------------------------- determinism


def test_same_seed_same_split_different_seed_differs():
    frame = random_data(5)
    a, b = split_of(frame, seed=11), split_of(frame, seed=11)
    np.testing.assert_array_equal(a, b)
    c = split_of(frame, seed=12)
    assert (a != c).sum() > 0.1 * len(frame)  # a real reshuffle, not one moved group


def test_split_does_not_depend_on_row_order():
    """The same images listed in another order get the same group -> split assignment."""
    frame = random_data(6)
    reordered = frame.iloc[np.random.default_rng(0).permutation(len(frame))].reset_index(drop=True)
    a = dict(zip(frame["image_id"], split_of(frame, seed=4), strict=True))
    b = dict(zip(reordered["image_id"], split_of(reordered, seed=4), strict=True))
    assert a == b


# -------------------------------------------------------------------- bad fractions


@pytest.mark.parametrize(
    ("val", "test"),
    [(-0.1, 0.1), (0.1, -0.01), (1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.6, 0.5), (math.nan, 0.1)],
)
def test_bad_fractions_raise(val, test):
    frame = random_data(0, groups_per_class=(5, 5))
    with pytest.raises(ValueError, match=r"data\.val_fraction"):
        split_of(frame, val=val, test=test)


# ------------------------------------------------------------------- the split file


@pytest.fixture
def table() -> pd.DataFrame:
    """A split table with ids that look numeric (leading zeros must survive the round trip)."""
    frame = random_data(7, groups_per_class=(40, 12, 6))
    frame["image_id"] = [f"{i:05d}" for i in range(len(frame))]
    frame["group"] = "0" + frame["group"].str.slice(1)
    frame["split"] = split_of(frame, seed=7)
    frame["path"] = "/nowhere/" + frame["image_id"] + ".jpg"  # extra column, not saved
    return frame


def test_write_then_read_gives_same_assignment(table, tmp_path):
    path = tmp_path / "sub" / "split.csv"
    write_split_csv(path, table)
    on_disk = pd.read_csv(path, dtype=str)
    assert list(on_disk.columns) == SPLIT_COLUMNS == ["image_id", "group", "label", "split"]
    assert on_disk["image_id"].tolist() == table["image_id"].tolist()
    # read back against the index listed in another order: aligned on image_id
    index = table[["image_id", "group", "label"]].iloc[::-1].reset_index(drop=True)
    split = read_split_csv(path, index)
    expected = dict(zip(table["image_id"], table["split"], strict=True))
    assert split.tolist() == [expected[i] for i in index["image_id"]]


def test_write_is_atomic_and_leaves_no_temp_files(table, tmp_path, monkeypatch):
    path = tmp_path / "split.csv"
    write_split_csv(path, table)
    assert sorted(os.listdir(tmp_path)) == ["split.csv"]
    write_split_csv(path, table)  # overwriting works too
    assert sorted(os.listdir(tmp_path)) == ["split.csv"]
    before = path.read_bytes()

    # a write that crashes half-way (the disk fills before the data reaches it) must leave the
    # previous split file intact and no temporary file behind
    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    changed = table.assign(split="train")
    with pytest.raises(OSError, match="the disk is full"):
        write_split_csv(path, changed)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["split.csv"]
    assert path.read_bytes() == before


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_split_file_for_other_images_is_refused(table, tmp_path, change):
    path = tmp_path / "split.csv"
    write_split_csv(path, table)
    index = table[["image_id", "group", "label"]]
    if change == "extra":  # the file lists images the data set no longer has
        index = index.iloc[3:]
    else:  # the data set has images the file does not list
        extra = pd.DataFrame({"image_id": ["99999"], "group": ["new"], "label": ["c0"]})
        index = pd.concat([index, extra], ignore_index=True)
    with pytest.raises(ValueError, match=re.escape(str(path))) as err:
        read_split_csv(path, index)
    message = str(err.value)
    assert "delete it" in message
    assert "--data.split_file" in message
    assert ("00000" if change == "extra" else "99999") in message  # names an example id


def test_split_file_with_a_group_in_two_splits_is_refused(table, tmp_path):
    sizes = table.groupby("group").size()
    group = sizes.index[sizes >= 2][0]
    rows = np.flatnonzero(table["group"] == group)
    bad = table.copy()
    bad.loc[rows[0], "split"] = "test" if bad.loc[rows[1], "split"] != "test" else "train"
    path = tmp_path / "split.csv"
    write_split_csv(path, bad)
    with pytest.raises(ValueError, match=re.escape(group)) as err:
        read_split_csv(path, table[["image_id", "group", "label"]])
    assert str(path) in str(err.value)
    assert "more than one split" in str(err.value)


def test_split_file_with_unknown_split_names_the_row(table, tmp_path):
    bad = table.copy()
    bad.loc[9, "split"] = "training"
    path = tmp_path / "split.csv"
    write_split_csv(path, bad)
    # data row 9 (0-based) is line 11 of the file: header = line 1
    with pytest.raises(ValueError, match=r"row 11\b.*'training'") as err:
        read_split_csv(path, table)
    assert str(path) in str(err.value)
    assert pd.read_csv(path, dtype=str)["split"].iloc[11 - 2] == "training"


def test_split_file_without_the_columns_is_refused(table, tmp_path):
    path = tmp_path / "split.csv"
    table[["image_id", "label"]].to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"lacks columns \['group', 'split'\]"):
        read_split_csv(path, table)


def test_split_file_with_a_duplicated_image_is_refused(table, tmp_path):
    path = tmp_path / "split.csv"
    write_split_csv(path, pd.concat([table, table.iloc[[4]]], ignore_index=True))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r", row \d+: .* listed more than once") as err:
        read_split_csv(path, table)
    assert table["image_id"].iloc[4] in str(err.value)


# ---------------------------------------------------------------- check_groups_disjoint


def test_check_groups_disjoint_names_the_leaking_groups():
    groups = pd.Series(["a", "a", "b", "b", "c", "d", "d"])
    ok = pd.Series(["train", "train", "val", "val", "test", "train", "train"])
    check_groups_disjoint(groups, ok, source="ok split")  # no error
    leak = pd.Series(["train", "test", "val", "val", "test", "train", "val"])
    with pytest.raises(ValueError, match=r"my-source: 2 groups .*\['a', 'd'\]"):
        check_groups_disjoint(groups, leak, source="my-source")
