"""``medmetric check-data``: every data check, no training -- the first thing to run on new data.

    medmetric check-data --data ham10000 --data_dir ../shared/data/ham10000
    medmetric check-data --config experiments/ham10000/stage1.yaml [--split_file runs/x/split.csv]

Works through the DataModule API (``read_index`` + the shared index checks), so every
``ImageClassificationDataModule`` in ``datamodules/`` is found by name without registering it:
``--data`` is the class name without ``DataModule``, case-insensitive (``ham10000``,
``isic2019``, ...), or a full class path. Prints counts per class and split, groups, groups
spanning splits, byte-identical duplicates, unreadable files, image modes and the size range,
and the dataset fingerprint. Exit status: 0 when no errors, 1 when errors, 2 on a usage error.
Nothing is written unless ``--write_split`` is given (the split is computed in memory).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

import datamodules
from datamodules.base import ImageClassificationDataModule
from datamodules.images import SIXTEEN_BIT_MODES
from datamodules.integrity import (
    content_hashes,
    dataset_fingerprint,
    duplicate_groups,
    find_group_leaks,
)
from datamodules.splits import SPLITS, read_split_csv, write_split_csv
from experiments.safe_config import check_class_paths


class UsageError(ValueError):
    pass


def datamodule_classes() -> dict[str, type]:
    """Every ImageClassificationDataModule subclass in datamodules/*, by short lower-case name."""
    found = {}
    for info in pkgutil.iter_modules(datamodules.__path__):
        try:
            module = importlib.import_module(f"datamodules.{info.name}")
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


def build_datamodule(args) -> ImageClassificationDataModule:
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
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in init.items() if k in accepted})


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
        saved = pd.read_csv(dm.split_file, dtype=str, keep_default_na=False)
        report.add(f"split: from {dm.split_file}")
        try:
            read_split_csv(dm.split_file, table, dm.group_key)
        except ValueError as err:
            report.error(str(err))
        if {"image_id", "split"} <= set(saved.columns):
            return table["image_id"].map(saved.drop_duplicates("image_id").set_index("image_id")["split"]).fillna("(none)").to_numpy()
        return np.full(len(table), "(none)", dtype=object)
    try:
        split = dm._new_split(table)  # the DataModule's own split (a source may override it)
    except ValueError as err:
        report.error(str(err))
        return np.full(len(table), "(none)", dtype=object)
    report.add(f"split: new split (val_fraction={dm.val_fraction}, test_fraction={dm.test_fraction}, "
               f"split_seed={dm.split_seed}; not saved{'' if dm.split_file is None else ', see --write_split'})")
    return split


def check(dm: ImageClassificationDataModule, workers: int = 4, write_split: bool = False) -> Report:
    report = Report()
    report.add(f"medmetric check-data: {type(dm).__name__} at {dm.data_dir}")
    try:
        table = dm._indexed_table()  # the index checks every DataModule runs at setup
    except (ValueError, FileNotFoundError) as err:
        report.error(str(err))
        return report
    split = assign_split(dm, table, report)
    table["split"] = split
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

    hashes = content_hashes(table["path"].tolist(), workers)
    duplicates = duplicate_groups(table["image_id"], hashes, table["split"])
    across = [d for d in duplicates if d["cross_split"]]
    report.add("")
    report.add(f"byte-identical duplicates: {len(duplicates)} sets ({sum(len(d['image_ids']) for d in duplicates)} images), "
               f"{len(across)} sets across splits")
    for dup in duplicates[:5]:
        report.add(f"  {dup['image_ids']} in {'+'.join(dup['splits'])}")
    if across:
        report.warn(f"{len(across)} sets of identical images sit in different splits (first: {across[0]['image_ids']}); "
                    "remove the copies or give them one group id, then make a new split")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = list(pool.map(inspect_image, table["path"].tolist(), chunksize=32))
    bad = [(table["image_id"].iloc[i], table["path"].iloc[i], err) for i, (_, _, err) in enumerate(decoded) if err]
    modes = Counter(mode for mode, _, _ in decoded if mode)
    shapes = np.array([size for _, size, _ in decoded if size] or [(0, 0)])
    report.add("")
    report.add(f"unreadable files: {len(bad)}")
    for image_id, path, err in bad[:10]:
        report.add(f"  {image_id}: {path}: {err}")
    if bad:
        report.error(f"{len(bad)} unreadable images (first: {bad[0][1]}); replace them or remove their rows "
                     "(or train with --data.bad_image_policy=skip to skip them, counted)")
    report.add(f"image modes: {dict(sorted(modes.items()))}")
    report.add(f"image size (width x height): min {shapes[:, 0].min()} x {shapes[:, 1].min()}, "
               f"max {shapes[:, 0].max()} x {shapes[:, 1].max()}")
    small = int((shapes.min(axis=1) < dm.image_size).sum()) if len(decoded) else 0
    report.add(f"images smaller than image_size={dm.image_size}: {small}")
    if small:
        report.warn(f"{small} images have a side shorter than data.image_size={dm.image_size}; they are upscaled")
    recovered = {
        "grayscale (replicated to RGB)": sum(n for m, n in modes.items() if m in ("L", "1")),
        "alpha channel (dropped)": sum(n for m, n in modes.items() if m in ("RGBA", "LA", "PA")),
        "16-bit (scaled to 8-bit)": sum(n for m, n in modes.items() if m in SIXTEEN_BIT_MODES),
    }
    for what, n in recovered.items():
        if n:
            report.warn(f"{n} images are {what}")

    report.add("")
    report.add(f"dataset fingerprint: {dataset_fingerprint(table, dm.data_dir, table['split'])}")
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        dm = build_datamodule(args)
    except (UsageError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = check(dm, args.workers, args.write_split)
    print(report.render())
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
