"""Grouped, stratified, seeded train/val/test splits, saved to and reused from a CSV.

Medical images of one lesion (or patient) are near-duplicates: if they land in two splits the
test score measures memorisation. So whole groups are assigned to a split, and within each
class the groups are shuffled and cut so every split gets about its fraction of the images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from medmetric.datamodules.integrity import check_no_group_leaks
from medmetric.run_io.atomic import atomic_write

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ["image_id", "group", "label", "split"]


def grouped_stratified_split(
    labels: pd.Series,
    groups: pd.Series,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> np.ndarray:
    """Return one of "train"/"val"/"test" per row.

    Each group goes wholly to one split. A group is stratified by its most frequent label; within
    a label, groups are shuffled (seeded) and laid end to end: the first ``test_fraction`` of the
    images go to test, the next ``val_fraction`` to val, the rest to train. A label with at least
    three groups always gets one group in each split.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must each be in [0, 1) "
            "and sum to less than 1 (data.val_fraction, data.test_fraction)"
        )
    frame = pd.DataFrame({"label": labels.to_numpy(), "group": groups.to_numpy()})
    sizes = frame.groupby("group", sort=True).size()
    group_label = frame.groupby("group", sort=True)["label"].agg(lambda s: s.value_counts().index[0])
    rng = np.random.default_rng(seed)
    assignment: dict = {}
    for label in sorted(group_label.unique(), key=str):
        names = group_label.index[group_label == label].to_numpy()
        names = names[rng.permutation(len(names))]
        counts = sizes.loc[names].to_numpy()
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) / counts.sum()
        split = np.where(
            starts < test_fraction, "test", np.where(starts < test_fraction + val_fraction, "val", "train")
        )
        if len(names) >= 3:
            _ensure_each_split(split, val_fraction, test_fraction)
        assignment.update(zip(names, split, strict=True))
    return frame["group"].map(assignment).to_numpy()


def _ensure_each_split(split: np.ndarray, val_fraction: float, test_fraction: float) -> None:
    """Move single groups so that every requested split of a label has at least one group."""
    wanted = [s for s, f in (("test", test_fraction), ("val", val_fraction)) if f > 0] + ["train"]
    for target in wanted:
        if (split == target).any():
            continue
        donors = [s for s in SPLITS if (split == s).sum() > 1]
        if not donors:
            return
        donor = max(donors, key=lambda s: (split == s).sum())
        idx = np.flatnonzero(split == donor)
        split[idx[-1] if target == "train" else idx[0]] = target


def write_split_csv(path: Path, table: pd.DataFrame) -> None:
    """Write the split atomically (a crash never leaves a half-written split file)."""
    text = table[SPLIT_COLUMNS].to_csv(index=False)
    atomic_write(path, lambda handle: handle.write(text.encode()), what="split file")


def read_split_csv(path: Path, index: pd.DataFrame, group_key: str = "group") -> pd.Series:
    """Read a saved split and check it describes exactly the images of ``index``.

    Returns the split name per row of ``index`` (aligned on ``image_id``).
    """
    saved = pd.read_csv(path, dtype={"image_id": str, "group": str, "label": str, "split": str})
    missing_cols = [c for c in SPLIT_COLUMNS if c not in saved.columns]
    if missing_cols:
        raise ValueError(
            f"split file {path} lacks columns {missing_cols} (expected {SPLIT_COLUMNS}); it was not "
            "written by medmetric: delete it or pass another --data.split_file"
        )
    bad = sorted(set(saved["split"]) - set(SPLITS))
    if bad:
        row = int(saved.index[saved["split"].isin(bad)][0]) + 2
        raise ValueError(f"split file {path}, row {row}: unknown split {bad[0]!r}; expected one of {SPLITS}")
    duplicated = saved["image_id"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise ValueError(
            f"split file {path}, row {row + 2}: image {saved['image_id'].iloc[row]!r} is listed more "
            "than once; delete the file to make a new split, or pass --data.split_file=<new path>"
        )
    saved_ids, index_ids = set(saved["image_id"]), set(index["image_id"])
    if saved_ids != index_ids:
        extra, absent = sorted(saved_ids - index_ids), sorted(index_ids - saved_ids)
        raise ValueError(
            f"split file {path} does not match the data set: {len(extra)} of its images are not in the "
            f"index (e.g. {extra[:3]}) and {len(absent)} indexed images are not in it (e.g. {absent[:3]}). "
            "It belongs to another data set or version: delete it to make a new split, or pass "
            "--data.split_file=<new path>"
        )
    saved = saved.set_index("image_id")
    split = index["image_id"].map(saved["split"])
    relabelled = int((index["image_id"].map(saved["label"]) != index["label"].astype(str)).sum())
    if relabelled:
        log.warning(
            "%s: %d images have another label than when the split was made; the split is kept "
            "(delete the file to re-stratify)", path, relabelled,
        )
    check_no_group_leaks(index["group"], split, f"split file {path}", index["image_id"], group_key, split_file=path)
    return split


def check_groups_disjoint(groups: pd.Series, split: pd.Series, source: str, **kwargs) -> None:
    """Refuse a split in which one group (lesion, patient) appears in two splits (see integrity.py)."""
    check_no_group_leaks(groups, split, source, **kwargs)
