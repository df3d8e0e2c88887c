"""``medmetric check-data``: every data check, no training -- the first thing to run on new data.

    medmetric check-data --data ham10000 --data_dir ../shared/data/ham10000
    medmetric check-data --data medmnist --data_dir ../shared/data/pneumoniamnist
    medmetric check-data --data kimiapath24 --data_dir /data/kimia.h5 --data.patch_size=250
    medmetric check-data --config experiments/ham10000/stage1.yaml [--split_file runs/x/split.csv]

Works through the DataModule's own hooks, so every ``ImageClassificationDataModule`` in
``datamodules/`` is found by name without registering it (``--data`` is the class name without
``DataModule``, case-insensitive, or a full class path): ``check_data_table`` (the checked
index; multi-label sources add multi-hot targets), ``_new_split`` / ``_saved_split`` (official
and fixed splits included), ``load_image`` for images that are not plain files (HDF5 slices,
MedMNIST npz rows), ``describe_source`` and ``fingerprint``. Prints counts per class and split
(multi-label: positives per label and split, all-negative images, GZSL hold-outs), groups,
groups spanning splits, duplicates (file bytes; decoded pixels of references), unreadable
images, image modes and the size range, and the dataset fingerprint. Exit status: 0 when no
errors, 1 when errors, 2 on a usage error. Nothing is written unless ``--write_split`` is given.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import os
import pkgutil
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from medmetric import datamodules
from medmetric.datamodules.base import ImageClassificationDataModule
from medmetric.datamodules.chest_xray import (
    NO_FINDING,
    TEST_LIST,
    TRAIN_VAL_LIST,
    ChestXray14DataModule,
)
from medmetric.datamodules.contracts import MULTILABEL_FIX, MultiLabelData, require
from medmetric.datamodules.images import SIXTEEN_BIT_MODES
from medmetric.datamodules.integrity import content_hashes, duplicate_groups, find_group_leaks
from medmetric.datamodules.medmnist import MedMNISTDataModule
from medmetric.datamodules.splits import SPLITS, write_split_csv
from medmetric.experiments.safe_config import check_class_paths


class UsageError(ValueError):
    pass


def datamodule_classes() -> dict[str, type]:
    """Every ImageClassificationDataModule subclass in datamodules/*, by short lower-case name."""
    found = {}
    for info in pkgutil.iter_modules(datamodules.__path__):
        try:
            module = importlib.import_module(f"medmetric.datamodules.{info.name}")
        except Exception:  # a module that needs an optional package: its classes are just not offered
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, ImageClassificationDataModule) and cls is not ImageClassificationDataModule and not inspect.isabstract(cls):
                found[cls.__name__.lower().removesuffix("datamodule")] = cls
    return found


def resolve_class(name: str) -> type:
    classes = datamodule_classes()
    if name.lower() in classes:
        return classes[name.lower()]
    if "." in name:
        check_class_paths({"data": {"class_path": name}})
        module, _, attr = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise UsageError(f"--data {name}: cannot import it ({err})") from err
    raise UsageError(f"--data {name!r}: unknown data set; valid: {sorted(classes)} or a class path")


def datamodule_arguments(args) -> tuple[type, dict]:
    """The DataModule class and its init arguments (a UsageError when they cannot be worked out)."""
    init: dict = {}
    name = args.data
    if args.config:
        config = yaml.safe_load(Path(args.config).read_text()) or {}
        data = config.get("data") or {}
        if not isinstance(data, dict) or "class_path" not in data:
            raise UsageError(f"{args.config}: no data.class_path in it; pass --data and --data_dir instead")
        name = name or data["class_path"]
        init.update(data.get("init_args") or {})
    if not name:
        raise UsageError("pass --data <name> --data_dir DIR, or --config <experiment yaml>")
    if args.data_dir:
        init["data_dir"] = args.data_dir
    if "data_dir" not in init:
        raise UsageError("--data_dir is required (the folder of the data set)")
    if args.image_size:
        init["image_size"] = args.image_size
    init.update(num_workers=0, preload=False, split_file=args.split_file)
    cls = resolve_class(name)
    accepted = init_parameters(cls)
    for flag in args.data_args:  # --data.patch_size=32 and the like, as in the training CLI
        key, sep, value = flag.removeprefix("--data.").partition("=")
        if not sep or key not in accepted:
            raise UsageError(f"{flag}: write --data.<argument>=<value> with an argument of {cls.__name__}: {sorted(accepted)}")
        init[key] = yaml.safe_load(value)
    return cls, {k: v for k, v in init.items() if k in accepted}


def init_parameters(cls: type) -> set[str]:
    """Names ``cls(...)`` accepts, following ``**kwargs`` up to the base classes' ``__init__``."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or not issubclass(klass, ImageClassificationDataModule):
            continue
        params = inspect.signature(klass.__init__).parameters
        names |= {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return names


def build_datamodule(args) -> ImageClassificationDataModule:
    cls, init = datamodule_arguments(args)
    return cls(**init)


def inspect_image(path: str) -> tuple[str | None, tuple[int, int] | None, str | None]:
    """(mode, (width, height), error) after a full decode (truncation shows only then)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.mode, img.size, None
    except Exception as err:  # noqa: BLE001 - every failure is a finding to list
        return None, None, f"{type(err).__name__}: {err}"


class Report:
    def __init__(self):
        self.lines: list[str] = []
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def add(self, text: str = "") -> None:
        self.lines.append(text)

    def error(self, text: str) -> None:
        self.errors.append(text)

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def render(self) -> str:
        tail = [f"errors ({len(self.errors)}):", *[f"  ERROR {e}" for e in self.errors]] if self.errors else ["errors: none"]
        warns = [f"warnings ({len(self.warnings)}):", *[f"  WARNING {w}" for w in self.warnings]] if self.warnings else ["warnings: none"]
        return "\n".join(self.lines + [""] + warns + tail)


def assign_split(dm: ImageClassificationDataModule, table: pd.DataFrame, report: Report) -> np.ndarray:
    if dm.split_file is not None and dm.split_file.is_file():
        report.add(f"split: from {dm.split_file}")
        try:
            return np.asarray(dm._saved_split(table), dtype=object)  # the DataModule's own checks of a saved split
        except ValueError as err:
            report.error(str(err))
        saved = pd.read_csv(dm.split_file, dtype=str, keep_default_na=False)
        if {"image_id", "split"} <= set(saved.columns):
            return table["image_id"].map(saved.drop_duplicates("image_id").set_index("image_id")["split"]).fillna("(none)").to_numpy()
        return np.full(len(table), "(none)", dtype=object)
    try:
        split = dm._new_split(table)  # the DataModule's own split (official/fixed splits included)
    except ValueError as err:
        report.error(str(err))
        return np.full(len(table), "(none)", dtype=object)
    report.add(f"split: {describe_new_split(dm, table)}; not saved{'' if dm.split_file is None else ', see --write_split'}")
    return split


def describe_new_split(dm: ImageClassificationDataModule, table: pd.DataFrame) -> str:
    if isinstance(dm, MedMNISTDataModule):
        return f"official train/val/test of {dm.npz_path.name}"
    if isinstance(dm, ChestXray14DataModule):
        return (f"official {TEST_LIST} is test; val carved by patient from {TRAIN_VAL_LIST} "
                f"(val_fraction={dm.val_fraction}, split_seed={dm.split_seed})")
    if "fixed_split" in table.columns:
        return (f"official test set kept; val carved from train (val_fraction={dm.val_fraction}, "
                f"split_seed={dm.split_seed})")
    return f"new split (val_fraction={dm.val_fraction}, test_fraction={dm.test_fraction}, split_seed={dm.split_seed})"


def single_label_counts(dm, table: pd.DataFrame, report: Report) -> None:
    classes = list(dm.class_names)
    counts = pd.crosstab(table["label"], table["split"]).reindex(index=classes, columns=list(SPLITS), fill_value=0)
    counts["total"] = counts.sum(axis=1)
    counts.loc["total"] = counts.sum(axis=0)
    report.add(f"images: {len(table)}   classes: {len(classes)}")
    report.add("")
    report.add("images per class and split:")
    report.add(counts.to_string())
    try:
        dm._check_every_class_in_every_split(table)
    except ValueError as err:
        report.error(str(err))


def multi_label_counts(dm, table: pd.DataFrame, targets: np.ndarray, report: Report) -> None:
    """Positives per label and split, all-negative images, GZSL hold-outs (no class crosstab)."""
    labels = list(dm.class_names)
    split = table["split"].to_numpy()
    positive = targets > 0.5
    counts = pd.DataFrame({s: positive[split == s].sum(axis=0) for s in SPLITS}, index=labels).astype(int)
    negative = ~positive.any(axis=1)
    counts.loc[f"{NO_FINDING} (all negative)"] = [int(negative[split == s].sum()) for s in SPLITS]
    counts.loc["images"] = [int((split == s).sum()) for s in SPLITS]
    counts["total"] = counts.sum(axis=1)
    report.add(f"images: {len(table)}   labels: {len(labels)} (multi-label)")
    report.add("")
    report.add("positive images per label and split:")
    report.add(counts.to_string())
    empty = [s for s in SPLITS if (split == s).sum() == 0]
    if empty:
        report.error(f"split {empty[0]!r} of {dm.split_file or dm.data_dir} is empty: every run needs train, val and test "
                     "images; check the official lists / split file and data.val_fraction")
    unseen = list(require(dm, MultiLabelData, "check-data (its multi-label report)", fix=MULTILABEL_FIX).unseen_labels)
    seen = [n for n in labels if n not in unseen]
    missing = [(n, s) for n in seen for s in SPLITS if counts.loc[n, s] == 0]
    if missing:
        report.warn(f"{len(missing)} (label, split) pairs have no positive image (first: "
                    f"{', '.join(f'{n!r} in {s}' for n, s in missing[:4])}); that label's AUROC there is undefined")
    if unseen:
        idx_u, idx_s = [labels.index(n) for n in unseen], [labels.index(n) for n in seen]
        only_unseen = positive[:, idx_u].any(axis=1) & ~positive[:, idx_s].any(axis=1)
        held = only_unseen & (split != "test")
        report.add(f"GZSL unseen labels: {unseen} (zeroed in train and val); images with only unseen findings "
                   f"held out of train+val: {int(held.sum())}")


def is_reference(path: str) -> bool:
    """A path that is not a plain file (HDF5 slice, npz row): read through the DataModule's load_image."""
    return "::" in path or not os.path.isfile(path)


def inspect_reference(load_image, ref: str) -> tuple[str | None, tuple[int, int] | None, str | None, str | None]:
    """(mode, (width, height), error, pixel hash) of one image read through the DataModule's loader."""
    try:
        pixels = np.ascontiguousarray(load_image(ref))
    except Exception as err:  # noqa: BLE001 - every failure is a finding to list
        return None, None, f"{type(err).__name__}: {err}", None
    channels = "gray" if pixels.ndim == 2 else f"{pixels.shape[2]}-channel" if pixels.ndim == 3 else f"{pixels.ndim}-d"
    digest = hashlib.blake2b(f"{pixels.dtype}{pixels.shape}".encode(), digest_size=16)
    digest.update(pixels.tobytes())
    return f"{pixels.dtype} {channels} array", (int(pixels.shape[1]), int(pixels.shape[0])), None, digest.hexdigest()


def check_images(dm, table: pd.DataFrame, workers: int, report: Report) -> None:
    paths = table["path"].astype(str).tolist()
    refs = np.array([is_reference(p) for p in paths], dtype=bool)
    files = np.flatnonzero(~refs).tolist()
    decoded: list = [None] * len(paths)
    hashes: list = [None] * len(paths)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, h in zip(files, content_hashes([paths[i] for i in files], workers), strict=True):
            hashes[i] = None if h is None else f"bytes:{h}"
        for i, result in zip(files, pool.map(inspect_image, [paths[i] for i in files], chunksize=32), strict=True):
            decoded[i] = result
    for i in np.flatnonzero(refs):  # one thread: h5py serialises reads anyway
        mode, size, err, pixel_hash = inspect_reference(dm.load_image, paths[i])
        decoded[i], hashes[i] = (mode, size, err), None if pixel_hash is None else f"pixels:{pixel_hash}"

    n_refs = int(refs.sum())
    what = "byte-identical" if not n_refs else "pixel-identical" if n_refs == len(paths) else "identical (file bytes; decoded pixels of references)"
    duplicates = duplicate_groups(table["image_id"], hashes, table["split"])
    across = [d for d in duplicates if d["cross_split"]]
    report.add("")
    if n_refs:
        report.add(f"{n_refs} images are references, not files (e.g. {paths[int(np.flatnonzero(refs)[0])]}): "
                   "decoded through the DataModule's load_image; their pixels are hashed, byte hashing skipped")
    report.add(f"{what} duplicates: {len(duplicates)} sets ({sum(len(d['image_ids']) for d in duplicates)} images), "
               f"{len(across)} sets across splits")
    for dup in duplicates[:5]:
        report.add(f"  {dup['image_ids']} in {'+'.join(dup['splits'])}")
    if across:
        report.warn(f"{len(across)} sets of identical images sit in different splits (first: {across[0]['image_ids']}); "
                    "remove the copies or give them one group id, then make a new split")

    bad = [(table["image_id"].iloc[i], paths[i], err) for i, (_, _, err) in enumerate(decoded) if err]
    modes = Counter(mode for mode, _, _ in decoded if mode)
    shapes = np.array([size for _, size, _ in decoded if size] or [(0, 0)])
    report.add("")
    report.add(f"unreadable {'images' if n_refs else 'files'}: {len(bad)}")
    for image_id, path, err in bad[:10]:
        report.add(f"  {image_id}: {path}: {err}")
    if bad:
        report.error(f"{len(bad)} unreadable images (first: {bad[0][1]}: {bad[0][2]}); replace them or remove their rows "
                     "(or train with --data.bad_image_policy=skip to skip them, counted)")
    report.add(f"image modes: {dict(sorted(modes.items()))}")
    report.add(f"image size (width x height): min {shapes[:, 0].min()} x {shapes[:, 1].min()}, "
               f"max {shapes[:, 0].max()} x {shapes[:, 1].max()}")
    small = int((shapes.min(axis=1) < dm.image_size).sum()) if len(decoded) and len(bad) < len(decoded) else 0
    report.add(f"images smaller than image_size={dm.image_size}: {small}")
    if small:
        report.warn(f"{small} images have a side shorter than data.image_size={dm.image_size}; they are upscaled")
    recovered = {  # PIL modes of files (arrays are reported by dtype and channels above)
        "grayscale (replicated to RGB)": sum(n for m, n in modes.items() if m in ("L", "1")),
        "alpha channel (dropped)": sum(n for m, n in modes.items() if m in ("RGBA", "LA", "PA")),
        "16-bit (scaled to 8-bit)": sum(n for m, n in modes.items() if m in SIXTEEN_BIT_MODES),
    }
    for what, n in recovered.items():
        if n:
            report.warn(f"{n} images are {what}")


def check(dm: ImageClassificationDataModule, workers: int = 4, write_split: bool = False) -> Report:
    report = Report()
    report.add(f"medmetric check-data: {type(dm).__name__} at {dm.data_dir}")
    try:
        table = dm.check_data_table()  # the index checks every DataModule runs at setup
    except (ValueError, OSError) as err:
        report.error(str(err))
        return report
    for line in dm.describe_source():
        report.add(line)
    targets = table.attrs.get("targets")
    table["split"] = assign_split(dm, table, report)
    if targets is None:
        single_label_counts(dm, table, report)
    else:
        multi_label_counts(dm, table, np.asarray(targets), report)

    sizes = table.groupby("group").size()
    report.add("")
    report.add(f"{dm.group_key} groups: {len(sizes)} (images per {dm.group_key}: min {sizes.min()}, "
               f"median {int(sizes.median())}, max {sizes.max()}; {int((sizes > 1).sum())} with more than one image)")
    per_split = table.groupby("split")["group"].nunique().reindex(list(SPLITS), fill_value=0)
    report.add(f"{dm.group_key} groups per split: " + ", ".join(f"{s} {int(n)}" for s, n in per_split.items()))
    leaks = find_group_leaks(table["group"], table["split"], table["image_id"])
    report.add(f"{dm.group_key} groups spanning splits: {len(leaks)}")
    for leak in leaks[:5]:
        report.add(f"  {leak.describe(dm.group_key)}")
    if leaks and not any("more than one split" in e for e in report.errors):
        report.error(f"{len(leaks)} {dm.group_key} groups span splits (first: {leaks[0].describe(dm.group_key)})")

    check_images(dm, table, workers, report)

    report.add("")
    try:
        report.add(f"dataset fingerprint: {dm.fingerprint(table)}")  # the DataModule's own, as results.json stores it
    except OSError as err:
        report.error(f"cannot fingerprint the data set: {err}")
    if write_split and dm.split_file is not None and not dm.split_file.exists() and not report.errors:
        write_split_csv(dm.split_file, table)
        report.add(f"wrote split {dm.split_file}")
    return report


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="medmetric check-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="data set: a DataModule name (ham10000, isic2019, ...) or class path")
    parser.add_argument("--data_dir", help="folder of the data set")
    parser.add_argument("--config", help="an experiment YAML; its data: section is used")
    parser.add_argument("--split_file", help="check this saved split (default: a new grouped split in memory)")
    parser.add_argument("--write_split", action="store_true", help="save the new split to --split_file when no error was found")
    parser.add_argument("--image_size", type=int, help="training size, for the 'smaller than' count")
    parser.add_argument("--workers", type=int, default=4, help="threads for hashing and decoding")
    parser.epilog = "Any other DataModule argument: --data.<name>=<value> (e.g. --data.patch_size=250)."
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--data.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.data_args = [a for a in rest if a.startswith("--data.")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cls, init = datamodule_arguments(args)
    except (UsageError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        dm = cls(**init)
    except (ValueError, OSError) as err:  # a source that reads its data when built (MedMNIST's npz)
        report = Report()
        report.add(f"medmetric check-data: {cls.__name__} at {init.get('data_dir')}")
        report.error(str(err))
        print(report.render())
        return 1
    report = check(dm, args.workers, args.write_split)
    print(report.render())
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
