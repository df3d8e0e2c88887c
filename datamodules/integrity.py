"""Data integrity checks shared by every DataModule: group leakage, duplicates, fingerprint.

* Group leakage: one lesion / patient / slide in two splits makes the test score measure
  memorisation. :func:`check_no_group_leaks` refuses such a split naming the first offenders
  (group, the splits it spans, its image ids) and the fix. A split file is the user's: it is
  never rewritten, the message says to delete it or point at a new one.
* Duplicates: the same image content under two ids in two splits leaks just the same, but
  it cannot be proven without reading every file. Content hashes are computed only when a split
  is created (once per experiment) and by ``medmetric check-data``, not at every ``setup``:
  HAM10000 (47 MB) hashes in well under a second, ISIC 2019 (9 GB) in about a minute, paid
  once when the split is made; a reused split was already checked when it was made.
  Duplicates are reported (a warning), not refused: some releases contain them knowingly.
* Fingerprint: what a run was trained and tested on -- image ids, file paths relative to the
  data folder, file sizes, labels, groups and the split -- hashed to one string. Sizes come
  from ``os.stat`` (about 1 s for 100k files); contents and modification times are left out
  on purpose: contents would cost a full read, and mtimes change when a data set is copied
  to another machine although nothing in it changed. A re-encoded or edited image almost
  always changes size; the content hashes of check-data cover the rest.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

FINGERPRINT_VERSION = "medmetric-fingerprint/1"
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


class GroupLeakError(ValueError):
    """A group (lesion, patient, slide) has images in more than one split."""


@dataclass(frozen=True)
class GroupLeak:
    group: str
    splits: tuple[str, ...]
    image_ids: tuple[str, ...]

    def describe(self, group_key: str, max_ids: int = 4) -> str:
        ids = list(self.image_ids[:max_ids]) + (["..."] if len(self.image_ids) > max_ids else [])
        return f"{group_key} {self.group!r} in {'+'.join(self.splits)} (images {', '.join(ids)})"


def find_group_leaks(groups: Sequence, split: Sequence, image_ids: Sequence | None = None) -> list[GroupLeak]:
    """Every group whose rows fall in more than one split, in order of first appearance."""
    frame = pd.DataFrame({"group": np.asarray(groups, dtype=object), "split": np.asarray(split, dtype=object)})
    frame["image_id"] = np.asarray(image_ids, dtype=object) if image_ids is not None else frame.index.astype(str)
    spans = frame.groupby("group", sort=False)["split"].nunique()
    leaks = []
    for group in spans.index[spans > 1]:
        rows = frame[frame["group"] == group]
        splits = tuple(sorted(rows["split"].unique(), key=lambda s: (SPLIT_ORDER.get(s, 9), s)))
        leaks.append(GroupLeak(str(group), splits, tuple(str(i) for i in rows["image_id"])))
    return leaks


def check_no_group_leaks(
    groups: Sequence,
    split: Sequence,
    source: str,
    image_ids: Sequence | None = None,
    group_key: str = "group",
    split_file: str | Path | None = None,
) -> None:
    """Raise :class:`GroupLeakError` naming the first leaking groups and how to fix it."""
    leaks = find_group_leaks(groups, split, image_ids)
    if not leaks:
        return
    first = "; ".join(leak.describe(group_key) for leak in leaks[:3])
    fix = (
        f"The split file is yours and is left unchanged: delete {split_file} (medmetric then makes a "
        f"grouped split) or pass --data.split_file=<new path>" if split_file else
        "Make the split by group (medmetric's own split does)"
    )
    raise GroupLeakError(
        f"{source}: {len(leaks)} {group_key}s appear in more than one split {[leak.group for leak in leaks[:5]]}; "
        f"first: {first}. "
        f"Images of one {group_key} in two splits leak information into validation/test. {fix}"
    )


# --- duplicates ------------------------------------------------------------------------------
def content_hash(path: str | Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hashes(paths: Sequence[str], workers: int = 4) -> list[str | None]:
    """blake2b of each file's bytes (None where the file cannot be read)."""

    def one(path):
        try:
            return content_hash(path)
        except OSError:
            return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, paths, chunksize=64))


def duplicate_groups(image_ids: Sequence, hashes: Sequence, split: Sequence | None = None) -> list[dict]:
    """Sets of images with identical bytes: ``{"image_ids", "splits", "cross_split"}`` each."""
    frame = pd.DataFrame({"image_id": list(image_ids), "hash": list(hashes)})
    frame["split"] = list(split) if split is not None else ""
    frame = frame.dropna(subset=["hash"])
    found = []
    for _, rows in frame[frame["hash"].duplicated(keep=False)].groupby("hash", sort=False):
        splits = sorted(set(rows["split"]), key=lambda s: (SPLIT_ORDER.get(s, 9), s))
        found.append({"image_ids": rows["image_id"].astype(str).tolist(), "splits": splits, "cross_split": len(splits) > 1})
    return found


def warn_duplicates_across_splits(table: pd.DataFrame, split: Sequence, source: str) -> list[dict]:
    """Hash every file of ``table`` (columns image_id, path) and warn about cross-split duplicates."""
    duplicates = duplicate_groups(table["image_id"], content_hashes(table["path"].tolist()), split)
    across = [d for d in duplicates if d["cross_split"]]
    if across:
        shown = "; ".join(f"{d['image_ids'][:3]} in {'+'.join(d['splits'])}" for d in across[:3])
        log.warning(
            "%s: %d sets of byte-identical images sit in different splits (first: %s). They leak like a "
            "shared lesion: remove the copies from the metadata CSV, or give them one group id, then "
            "delete the split file to re-split. `medmetric check-data` lists them all", source, len(across), shown,
        )
    return duplicates


# --- fingerprint -----------------------------------------------------------------------------
def dataset_fingerprint(table: pd.DataFrame, data_dir: str | Path, split: Sequence) -> str:
    """One hash of image ids, relative paths, file sizes, labels, groups and split (see module doc)."""
    data_dir = os.path.abspath(data_dir)
    digest = hashlib.sha256(FINGERPRINT_VERSION.encode())
    order = np.argsort(table["image_id"].astype(str).to_numpy(), kind="stable")
    ids, paths = table["image_id"].astype(str).to_numpy(), table["path"].astype(str).to_numpy()
    labels, groups = table["label"].astype(str).to_numpy(), table["group"].astype(str).to_numpy()
    split = np.asarray(split, dtype=object)
    for i in order:
        file, sep, ref = paths[i].partition("::")  # an HDF5 reference "<file>::<slice>": its file's size
        size = os.stat(file).st_size
        rel = os.path.relpath(os.path.abspath(file), data_dir) + sep + ref
        digest.update(f"\n{ids[i]}\t{rel}\t{size}\t{labels[i]}\t{groups[i]}\t{split[i]}".encode())
    return digest.hexdigest()


class FingerprintMismatchError(ValueError):
    """Two runs (or a run and a manifest) were made on different data."""
