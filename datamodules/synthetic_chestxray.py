"""A tiny synthetic ChestX-ray14, written in the real release's on-disk format.

Why: tests and smoke runs need data the very same loader reads as the real release, that is
multi-label and imbalanced like it, that has images whose only findings are the default GZSL
unseen labels, and that carries a learnable signal per label (so a tiny CNN's AUROC clearly
beats 0.5 after a short run).

What: each image is a gray "chest" (two darker lung fields, noise, exposure jitter); each
finding adds a bright blob at its own place on a 4 x 4 grid, so labels are independent and
learnable. Label frequencies follow the real release (Infiltration common, Hernia rare), with
a floor of ``min_positives`` images per label in both train_val and test. About one patient in
five is a test patient (``test_list.txt``), as in the official patient-wise split.
Deterministic in ``seed``.
"""

from __future__ import annotations

import csv
import errno
from pathlib import Path

import numpy as np
from PIL import Image

from medmetric.datamodules.chest_xray import (
    CHESTXRAY14_LABELS,
    DEFAULT_UNSEEN,
    NO_FINDING,
    TEST_LIST,
    TRAIN_VAL_LIST,
)

# Fraction of images with each finding in the real release (112,120 images).
CHESTXRAY14_PREVALENCE = {
    "Atelectasis": 0.103, "Cardiomegaly": 0.025, "Effusion": 0.119, "Infiltration": 0.177,
    "Mass": 0.052, "Nodule": 0.056, "Pneumonia": 0.013, "Pneumothorax": 0.047,
    "Consolidation": 0.042, "Edema": 0.021, "Emphysema": 0.022, "Fibrosis": 0.015,
    "Pleural_Thickening": 0.030, "Hernia": 0.002,
}  # fmt: skip
DATA_ENTRY_HEADER = (
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]", "",
)  # fmt: skip  (the real header: bracketed names split by commas, and a trailing comma)


def write_chestxray14(
    root,
    n_patients: int = 100,
    seed: int = 0,
    image_size: int = 64,
    layout: str = "split",
    bit_depth: int = 8,
    min_positives: int = 4,
    unseen_only: int = 6,
    test_fraction: float = 0.25,
    metadata_name: str = "Data_Entry_2017.csv",
) -> Path:
    """Write a ChestX-ray14-format data set to ``root``; returns ``root``.

    Patients have 1-4 images (follow-ups). ``layout``: ``split`` puts images in
    ``images_001/images`` and ``images_002/images`` (Kaggle), ``flat`` in ``images/`` (NIH box).
    ``bit_depth`` 8 or 16 (16-bit gray PNGs). ``min_positives``: each label's floor, in both
    train_val and test. ``unseen_only``: images per part whose findings are only default GZSL
    unseen labels. Refuses to overwrite an existing CSV.
    """
    root = Path(root)
    if layout not in ("split", "flat"):
        raise ValueError(f"layout must be 'split' or 'flat', got {layout!r}")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    csv_path = root / metadata_name
    if csv_path.exists():
        raise FileExistsError(errno.EEXIST, "refusing to overwrite existing file", str(csv_path))
    rng = np.random.default_rng(seed)
    sizes = rng.choice([1, 2, 3, 4], size=n_patients, p=[0.4, 0.3, 0.2, 0.1])
    patient_ids = 1 + rng.choice(30805, size=n_patients, replace=False)
    is_test = np.zeros(n_patients, dtype=bool)
    is_test[rng.permutation(n_patients)[: max(2, round(test_fraction * n_patients))]] = True
    image_patient = np.repeat(np.arange(n_patients), sizes)
    n = len(image_patient)
    prevalence = np.array([CHESTXRAY14_PREVALENCE[c] for c in CHESTXRAY14_LABELS])
    targets = rng.random((n, len(CHESTXRAY14_LABELS))) < prevalence
    unseen = [CHESTXRAY14_LABELS.index(c) for c in DEFAULT_UNSEEN]
    for part in (is_test[image_patient], ~is_test[image_patient]):
        rows = rng.permutation(np.flatnonzero(part))
        need = 2 * min_positives + unseen_only
        if len(rows) < need:
            raise ValueError(f"n_patients={n_patients} is too small for min_positives={min_positives}; raise n_patients")
        for j, row in enumerate(rows[:unseen_only]):  # images with only unseen findings
            targets[row] = False
            targets[row, unseen[j % len(unseen)]] = True
        free = rows[unseen_only:]
        for c in range(len(CHESTXRAY14_LABELS)):
            missing = min_positives - int(targets[free, c].sum())
            if missing > 0:
                candidates = free[~targets[free, c]]
                targets[rng.choice(candidates, missing, replace=False), c] = True

    folders = [root / "images"] if layout == "flat" else [root / "images_001" / "images", root / "images_002" / "images"]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    rows, train_val, test = [], [], []
    k = 0
    for p in range(n_patients):
        for follow_up in range(sizes[p]):
            name = f"{patient_ids[p]:08d}_{follow_up:03d}.png"
            findings = [CHESTXRAY14_LABELS[c] for c in np.flatnonzero(targets[k])]
            pixels = _render(targets[k], image_size, rng)
            folder = folders[0] if layout == "flat" or k < n // 2 else folders[1]
            _save_png(folder / name, pixels, bit_depth, rng)
            age = int(rng.integers(18, 90))
            rows.append((
                name, "|".join(findings) or NO_FINDING, follow_up, int(patient_ids[p]), age,
                "M" if rng.random() < 0.56 else "F", "PA" if rng.random() < 0.6 else "AP",
                image_size, image_size, 0.143, 0.143, "",
            ))
            (test if is_test[p] else train_val).append(name)
            k += 1
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(DATA_ENTRY_HEADER)
        writer.writerows(rows)
    (root / TRAIN_VAL_LIST).write_text("\n".join(sorted(train_val)) + "\n")
    (root / TEST_LIST).write_text("\n".join(sorted(test)) + "\n")
    return root


def _render(findings: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A float image in [0, 1]: chest background plus one bright blob per finding."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.full((size, size), 0.55, dtype=np.float32) + rng.normal(0, 0.05)
    for cx in (0.3, 0.7):  # lung fields
        img -= 0.25 * np.exp(-(((xx - cx) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    for c in np.flatnonzero(findings):
        gx, gy = (c % 4 + 0.5) / 4, (c // 4 + 0.5) / 4
        gx, gy = gx + rng.normal(0, 0.02), gy + rng.normal(0, 0.02)
        img += 0.35 * np.exp(-((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * 0.06**2))
    img += rng.normal(0, 0.04, img.shape)
    return np.clip(img, 0, 1)


def _save_png(path: Path, pixels: np.ndarray, bit_depth: int, rng: np.random.Generator) -> None:
    if bit_depth == 16:
        Image.fromarray(np.rint(pixels * 65535).astype(np.uint16)).save(path, "PNG")
    else:
        Image.fromarray(np.rint(pixels * 255).astype(np.uint8), "L").save(path, "PNG")
