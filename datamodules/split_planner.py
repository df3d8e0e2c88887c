"""Split planners: how a DataModule's index becomes train/val/test, and the checks on a split.

A DataModule plugs one planner in (``split_planner`` class attribute) instead of overriding
split methods. A planner makes a new split, reads a saved one (the split file is the user's:
it is checked, never rewritten) and runs the group-leak and duplicate checks, so every source
gets the same guarantees:

* :class:`GroupedSplit` (default): grouped, stratified split by lesion/patient/slide; an
  official ``train``/``test`` column in the index keeps its test set and val is carved from train.
* :class:`OfficialSplit`: the index's own train/val/test, as it is (MedMNIST npz).
* :class:`OfficialTestPatientSplit`: official test list kept; val carved from the train list
  by patient (ChestX-ray14).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from medmetric.datamodules.integrity import warn_duplicates_across_splits
from medmetric.datamodules.splits import (
    SPLITS,
    check_groups_disjoint,
    grouped_stratified_split,
    read_split_csv,
)


class GroupedSplit:
    """Grouped stratified split (splits.py); a ``fixed_split`` column (train/test) is kept."""

    fixed_values = ("train", "test")  # what an index's ``split`` column may hold
    keep_columns: tuple[str, ...] = ()  # index columns besides image_id, path, label, group

    def new(self, dm, table: pd.DataFrame) -> np.ndarray:
        if "fixed_split" in table.columns:  # official test set kept; val carved from train
            split = table["fixed_split"].to_numpy().astype(object)
            train = np.flatnonzero(split == "train")
            split[train] = grouped_stratified_split(
                table["label"].iloc[train], table["group"].iloc[train], dm.val_fraction, 0.0, dm.split_seed
            )
        else:
            split = grouped_stratified_split(table["label"], table["group"], dm.val_fraction, dm.test_fraction, dm.split_seed)
        check_groups_disjoint(table["group"], pd.Series(split), source="new split",
                              image_ids=table["image_id"], group_key=dm.group_key)
        warn_duplicates_across_splits(table, split, source=f"new split of {dm.data_dir}")
        return split

    def saved(self, dm, table: pd.DataFrame) -> np.ndarray:
        """The split of ``dm.split_file`` per row of ``table``, checked against the index."""
        return read_split_csv(dm.split_file, table, dm.group_key).to_numpy()


class OfficialSplit(GroupedSplit):
    """The index's own train/val/test split (``split`` column), used as it is."""

    fixed_values = SPLITS

    def new(self, dm, table: pd.DataFrame) -> np.ndarray:
        return table["fixed_split"].to_numpy().copy()

    def saved(self, dm, table: pd.DataFrame) -> np.ndarray:
        saved = read_split_csv(dm.split_file, table).to_numpy()
        if (saved != table["fixed_split"].to_numpy()).any():
            raise ValueError(f"split file {dm.split_file} differs from {dm.official_split_name}'s official split; delete it")
        return saved


class OfficialTestPatientSplit(GroupedSplit):
    """Official test list kept (``official`` column ``test``); val carved by patient from the
    ``train_val`` rows with ``patient_split`` (seeded, patients laid end to end)."""

    keep_columns = ("official",)

    def __init__(self, test_list: str, train_val_list: str):
        self.test_list, self.train_val_list = test_list, train_val_list

    def new(self, dm, table: pd.DataFrame) -> np.ndarray:
        split = np.full(len(table), "test", dtype=object)
        train_val = (table["official"] == "train_val").to_numpy()
        split[train_val] = patient_split(table["group"][train_val], dm.val_fraction, dm.split_seed)
        check_groups_disjoint(table["group"], pd.Series(split), source=f"{dm.data_dir} official lists")
        return split

    def saved(self, dm, table: pd.DataFrame) -> np.ndarray:
        split = read_split_csv(dm.split_file, table).to_numpy()
        moved = (split == "test") != (table["official"] == "test").to_numpy()
        if moved.any():
            raise ValueError(
                f"split file {dm.split_file}: {int(moved.sum())} images disagree with the official "
                f"{self.test_list} (e.g. {table['image_id'][moved].iloc[0]!r}); delete the split file to re-make it"
            )
        return split


def patient_split(patients: pd.Series, val_fraction: float, seed: int) -> np.ndarray:
    """``train``/``val`` per image: patients shuffled (seeded), the first ones laid end to end
    until ``val_fraction`` of the images are in val; each patient wholly in one split."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    sizes = patients.value_counts().sort_index()
    order = sizes.index.to_numpy()[np.random.default_rng(seed).permutation(len(sizes))]
    starts = np.concatenate([[0], np.cumsum(sizes.loc[order].to_numpy())[:-1]]) / len(patients)
    val = set(order[starts < val_fraction])
    return np.where(patients.isin(val).to_numpy(), "val", "train")


def check_every_class_in_every_split(table: pd.DataFrame, class_names, where, data_dir, group_key: str) -> None:
    """Refuse an empty split, or a class without images in a split (single-label sources)."""
    sizes = table["split"].value_counts()
    empty_splits = [s for s in SPLITS if sizes.get(s, 0) == 0]
    if empty_splits:
        raise ValueError(
            f"split {empty_splits[0]!r} of {data_dir} is empty ({ {s: int(sizes.get(s, 0)) for s in SPLITS} }): "
            "every run needs train images, val images (model selection) and test images (the score). "
            "Set data.val_fraction and data.test_fraction > 0, or fix the split file (delete it to make a new one)"
        )
    counts = pd.crosstab(table["label"], table["split"]).reindex(index=class_names, columns=list(SPLITS), fill_value=0)
    empty = [(c, s) for c in class_names for s in SPLITS if counts.loc[c, s] == 0]
    if empty:
        where_text = ", ".join(f"{c!r} in {s}" for c, s in empty[:6])
        totals = counts.sum(axis=1)
        raise ValueError(
            f"a class has no images in a split of {where}: {where_text} (class totals: "
            f"{ {c: int(totals[c]) for c, _ in empty[:6]} }, {group_key}s are kept whole). "
            "Add images of that class, lower data.val_fraction/data.test_fraction, or change "
            "data.split_seed (delete the split file first if one was saved)"
        )
