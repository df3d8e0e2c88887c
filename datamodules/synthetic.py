"""Tiny synthetic HAM10000 and ISIC 2019 datasets, written in the real on-disk formats.

Why: tests and the demo (fallback when the real data is absent) need data that the very same
loaders read as the real releases, that is class-imbalanced like them, and that carries a
learnable signal, so a tiny CNN trained a few hundred steps at 32-64 px clearly beats chance.

What: every class is a coloured blob on a noisy skin-coloured background. Classes differ mostly
in hue (evenly spaced), then in shape (disk / ring / stripes / dark core), size and brightness.
Each lesion draws its own position, size, rotation, skin tone and small colour offset; its
images repeat those with a small perturbation and fresh noise, so they look alike. Every class
gets at least ``MIN_LESIONS_PER_CLASS`` lesions, so grouped train/val/test splits can hold each.
Output is deterministic in ``seed`` (same CSV bytes, same pixels); PIL + numpy only.
"""

from __future__ import annotations

import colorsys
import csv
import errno
import math
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from medmetric.datamodules.skin import HAM10000_CLASSES, ISIC2019_CLASSES, ISIC2019_UNKNOWN  # noqa: E402

# Class proportions of the real releases (HAM10000: 10015 images; ISIC 2019 training: 25331).
HAM10000_PROPORTIONS = {
    "akiec": 0.033, "bcc": 0.051, "bkl": 0.110, "df": 0.0115,
    "mel": 0.111, "nv": 0.669, "vasc": 0.0145,
}  # fmt: skip
ISIC2019_PROPORTIONS = {
    "MEL": 0.179, "NV": 0.508, "BCC": 0.131, "AK": 0.034,
    "BKL": 0.104, "DF": 0.0095, "VASC": 0.010, "SCC": 0.025,
}  # fmt: skip

MIN_LESIONS_PER_CLASS = 6
JPEG_QUALITY = 90

HAM10000_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
ISIC2019_GT_COLUMNS = ("image", *ISIC2019_CLASSES, ISIC2019_UNKNOWN)
ISIC2019_META_COLUMNS = ("image", "age_approx", "anatom_site_general", "lesion_id", "sex")

_LESION_SIZE_P = (0.7, 0.2, 0.1)  # P(1, 2, 3 images per lesion), roughly as in HAM10000
_HAM_SITES = {
    "back": 0.22, "lower extremity": 0.21, "trunk": 0.14, "upper extremity": 0.11,
    "abdomen": 0.10, "face": 0.07, "chest": 0.04, "foot": 0.03, "unknown": 0.02,
    "neck": 0.02, "scalp": 0.01, "hand": 0.01, "ear": 0.01, "genital": 0.005, "acral": 0.005,
}  # fmt: skip
_ISIC_SITES = {
    "anterior torso": 0.26, "lower extremity": 0.18, "head/neck": 0.18, "upper extremity": 0.12,
    "posterior torso": 0.11, "palms/soles": 0.02, "oral/genital": 0.01, "lateral torso": 0.01,
    "": 0.11,
}  # fmt: skip
_SHAPES = ("disk", "ring", "stripes", "core")
_RADII = (0.30, 0.24, 0.34, 0.27, 0.32, 0.22, 0.28, 0.36)  # fraction of min(width, height)
_SKIN = ((225, 180, 150), (205, 150, 120), (235, 195, 170), (190, 140, 110))


def write_ham10000(
    root,
    n_images: int = 300,
    image_size: tuple[int, int] = (80, 60),
    seed: int = 0,
    class_weights: dict[str, float] | None = None,
) -> pathlib.Path:
    """Writes root/HAM10000_metadata.csv and root/images/<image_id>.jpg; returns root.

    ``image_size`` is (width, height). ``class_weights`` (class -> weight, normalised; absent
    classes weigh 0) overrides ``HAM10000_PROPORTIONS``; every class still gets at least
    ``MIN_LESIONS_PER_CLASS`` lesions. Raises FileExistsError if the CSV already exists.
    """
    root = pathlib.Path(root)
    csv_path = root / "HAM10000_metadata.csv"
    _refuse_existing(csv_path)
    meta_rng, img_rng = _rngs(seed)
    lesions = _plan(HAM10000_CLASSES, n_images, class_weights or HAM10000_PROPORTIONS, meta_rng)
    lesion_nums = meta_rng.choice(max(7470, 2 * len(lesions)), len(lesions), replace=False)
    image_nums = 24306 + meta_rng.choice(max(10015, 2 * n_images), n_images, replace=False)

    rows, names, k = [], [], 0
    for (cls, size), lesion_num in zip(lesions, lesion_nums, strict=True):
        dx = HAM10000_CLASSES[cls]
        types = {"follow_up": 0.55, "histo": 0.35, "consensus": 0.09, "confocal": 0.01}
        if dx != "nv":
            types = {"histo": 0.85, "consensus": 0.13, "confocal": 0.02}
        dx_type = _pick(meta_rng, types)
        age = "" if meta_rng.random() < 0.03 else f"{5.0 * meta_rng.integers(1, 18):.1f}"
        sex = _pick(meta_rng, {"male": 0.54, "female": 0.45, "unknown": 0.01})
        site = _pick(meta_rng, _HAM_SITES)
        names.append([f"ISIC_{num:07d}" for num in image_nums[k : k + size]])
        rows += [(f"HAM_{lesion_num:07d}", i, dx, dx_type, age, sex, site) for i in names[-1]]
        k += size

    _write_images(root / "images", lesions, names, len(HAM10000_CLASSES), image_size, img_rng)
    _write_csv(csv_path, HAM10000_COLUMNS, rows)
    return root


def write_isic2019(
    root,
    n_images: int = 300,
    image_size: tuple[int, int] = (80, 60),
    seed: int = 0,
    with_metadata: bool = True,
    class_weights: dict[str, float] | None = None,
) -> pathlib.Path:
    """Writes root/ISIC_2019_Training_GroundTruth.csv, root/ISIC_2019_Training_Input/<image>.jpg
    and (with_metadata) root/ISIC_2019_Training_Metadata.csv; returns root.

    Rows are sorted by image name, as in the real files; a few names carry the ``_downsampled``
    suffix and some single-image lesions have an empty ``lesion_id``. ``class_weights`` works
    as in ``write_ham10000``. Raises FileExistsError if a CSV to be written already exists.
    """
    root = pathlib.Path(root)
    gt_path = root / "ISIC_2019_Training_GroundTruth.csv"
    meta_path = root / "ISIC_2019_Training_Metadata.csv"
    _refuse_existing(gt_path, *([meta_path] if with_metadata else []))
    meta_rng, img_rng = _rngs(seed)
    lesions = _plan(ISIC2019_CLASSES, n_images, class_weights or ISIC2019_PROPORTIONS, meta_rng)
    lesion_nums = meta_rng.choice(max(20000, 2 * len(lesions)), len(lesions), replace=False)
    image_nums = meta_rng.choice(max(73255, 3 * n_images), n_images, replace=False)
    downsampled = meta_rng.random(n_images) < 0.03
    downsampled[0] = downsampled[0] or not downsampled.any()
    singles = [i for i, (_, size) in enumerate(lesions) if size == 1]
    no_id = {i for i in singles if meta_rng.random() < 0.15} or set(singles[:1])

    records, names, k = [], [], 0  # records: (image, cls, age, site, lesion_id, sex)
    for i, ((cls, size), lesion_num) in enumerate(zip(lesions, lesion_nums, strict=True)):
        age = "" if meta_rng.random() < 0.02 else f"{5.0 * meta_rng.integers(1, 18):.1f}"
        site = _pick(meta_rng, _ISIC_SITES)
        sex = "" if meta_rng.random() < 0.015 else _pick(meta_rng, {"male": 0.52, "female": 0.48})
        lesion_id = "" if i in no_id else f"BCN_{lesion_num:07d}"
        names.append([])
        for _ in range(size):
            image = f"ISIC_{image_nums[k]:07d}" + ("_downsampled" if downsampled[k] else "")
            records.append((image, cls, age, site, lesion_id, sex))
            names[-1].append(image)
            k += 1
    records.sort(key=lambda r: r[0])

    n_classes = len(ISIC2019_CLASSES)
    _write_images(root / "ISIC_2019_Training_Input", lesions, names, n_classes, image_size, img_rng)
    gt_rows = [
        (r[0], *("1.0" if c == r[1] else "0.0" for c in range(n_classes)), "0.0") for r in records
    ]
    _write_csv(gt_path, ISIC2019_GT_COLUMNS, gt_rows)
    if with_metadata:
        _write_csv(meta_path, ISIC2019_META_COLUMNS, [(r[0], *r[2:]) for r in records])
    return root


def _refuse_existing(*paths: pathlib.Path) -> None:
    for path in paths:
        if path.exists():
            raise FileExistsError(errno.EEXIST, "refusing to overwrite existing file", str(path))


def _rngs(seed: int) -> list[np.random.Generator]:
    """Independent streams for the tables and the pixels."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2)]


def _pick(rng: np.random.Generator, probs: Mapping[str, float]) -> str:
    keys = list(probs)
    p = np.array([probs[key] for key in keys], dtype=float)
    return keys[rng.choice(len(keys), p=p / p.sum())]


def _class_counts(classes: Sequence[str], n_images: int, weights: Mapping[str, float]) -> list[int]:
    """Images per class: proportional to ``weights``, at least MIN_LESIONS_PER_CLASS each."""
    unknown = set(weights) - set(classes)
    if unknown:
        raise ValueError(f"unknown classes in class_weights: {sorted(unknown)}; known: {classes}")
    w = np.array([max(float(weights.get(c, 0.0)), 0.0) for c in classes])
    if w.sum() <= 0:
        raise ValueError("class_weights must contain a positive weight")
    floor = MIN_LESIONS_PER_CLASS
    if n_images < floor * len(classes):
        raise ValueError(f"n_images must be >= {floor * len(classes)} ({floor} lesions per class)")
    counts = np.maximum(np.round(w / w.sum() * n_images).astype(int), floor)
    while (diff := n_images - int(counts.sum())) != 0:  # settle the total on the largest classes
        i = int(np.argmax(counts))
        counts[i] += diff if diff > 0 else -min(-diff, counts[i] - floor)
    return counts.tolist()


def _lesion_sizes(n: int, rng: np.random.Generator) -> list[int]:
    """Split n images into lesions of 1-3 images, at least MIN_LESIONS_PER_CLASS of them."""
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(int(rng.choice(3, p=_LESION_SIZE_P)) + 1)
    sizes[-1] -= sum(sizes) - n
    while len(sizes) < MIN_LESIONS_PER_CLASS:
        sizes[int(np.argmax(sizes))] -= 1
        sizes.append(1)
    return sizes


def _plan(classes, n_images, weights, rng) -> list[tuple[int, int]]:
    """Shuffled list of lesions as (class index, number of images)."""
    counts = _class_counts(classes, n_images, weights)
    lesions = [(c, s) for c, n in enumerate(counts) for s in _lesion_sizes(n, rng)]
    return [lesions[i] for i in rng.permutation(len(lesions))]


def _lesion_style(cls: int, n_classes: int, rng: np.random.Generator) -> dict:
    """Blob parameters of one lesion: class appearance plus per-lesion jitter."""
    hue = (cls / n_classes + rng.uniform(-0.02, 0.02)) % 1.0
    value = (0.85 if cls % 2 == 0 else 0.6) * rng.uniform(0.92, 1.05)
    colour = colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 0.95), min(value, 1.0))
    return {
        "colour": 255.0 * np.array(colour, dtype=np.float32),
        "shape": _SHAPES[cls % len(_SHAPES)],
        "radius": _RADII[cls % len(_RADII)] * rng.uniform(0.85, 1.15),
        "aspect": rng.uniform(0.75, 1.0),
        "angle": rng.uniform(0.0, math.pi),
        "centre": rng.uniform(0.38, 0.62, size=2),
        "skin": np.array(_SKIN[rng.integers(len(_SKIN))], dtype=np.float32)
        + rng.uniform(-10, 10, size=3),
        "gradient": rng.uniform(-0.15, 0.15, size=2),
    }


def _soft(signed_px: np.ndarray) -> np.ndarray:
    """Anti-aliased inside-indicator of a signed pixel distance (positive inside)."""
    return np.clip(signed_px / 1.5 + 0.5, 0.0, 1.0)


def _render(style: dict, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """One RGB uint8 image (height, width, 3) of a lesion, slightly perturbed and noisy."""
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    shade = (
        1.0 + style["gradient"][0] * (xx / width - 0.5) + style["gradient"][1] * (yy / height - 0.5)
    )
    img = style["skin"] * shade[..., None] + rng.normal(0.0, 6.0, (height, width, 3))

    cx, cy = (style["centre"] + rng.normal(0.0, 0.02, size=2)) * (width, height)
    r = style["radius"] * min(width, height) * rng.uniform(0.93, 1.07)
    angle = style["angle"] + rng.normal(0.0, 0.15)
    u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
    v = (yy - cy) * math.cos(angle) - (xx - cx) * math.sin(angle)
    inside = r - np.sqrt(u**2 + (v / style["aspect"]) ** 2)  # ~ pixels inside the edge

    alpha = _soft(inside)
    colour = style["colour"] * (1.0 + 0.1 * rng.normal(0.0, 1.0, (height, width, 1)))
    if style["shape"] == "ring":
        alpha = alpha * (1.0 - _soft(inside - 0.45 * r))
    elif style["shape"] == "stripes":
        alpha = alpha * np.clip(2.0 * np.sin(2.0 * math.pi * u / max(0.6 * r, 3.0)) + 0.5, 0, 1)
    elif style["shape"] == "core":
        colour = colour * (1.0 - 0.65 * _soft(inside - 0.55 * r))[..., None]
    img = img * (1.0 - alpha[..., None]) + colour * alpha[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_images(folder, lesions, names, n_classes, size, rng) -> None:
    """Render and save every lesion's images as JPEG ``folder/<name>.jpg``."""
    width, height = (int(s) for s in size)
    if width < 8 or height < 8:
        raise ValueError(f"image_size must be (width, height) >= 8 px, got {size}")
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for (cls, _), lesion_names in zip(lesions, names, strict=True):
        style = _lesion_style(cls, n_classes, rng)
        for name in lesion_names:
            pixels = _render(style, (width, height), rng)
            Image.fromarray(pixels, "RGB").save(
                folder / f"{name}.jpg", "JPEG", quality=JPEG_QUALITY
            )


def _write_csv(path: pathlib.Path, header: Sequence[str], rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)

from medmetric.datamodules.synthetic_chestxray import write_chestxray14  # noqa: E402,F401  (ChestX-ray14 format)
