"""Data-loading benchmark: images/s with the preprocessed image cache vs decoding the JPEG each time.

The same ImageDataset (datamodules/base.py) is read in one process (num_workers=0, so the
numbers are per loader worker), once decoding the source file on every access (the default),
once from the memory-mapped cache (datamodules/cache.py), at the demo's 64 px and at 224 px, with
the training transform (dermoscopy) and with the eval transform (resize only). Also: the raw
fetch without any transform (decode+shrink vs cache read) and the one-time cache build.
Uses the real HAM10000 at ../shared/data/ham10000 when present (else a generated set); that copy
is downsized to 200x150, so the same measurement is repeated on ``--full_res_n`` of its images
re-encoded at the original release's 600x450 (JPEG quality 90), where decoding costs more.

    python -m bench.data_loading [--n 1500] [--full_res_n 500] [--sizes 64 224] [--data_dir ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402

from medmetric.datamodules.base import ImageDataset  # noqa: E402
from medmetric.datamodules.cache import open_image_cache, stored_min_side  # noqa: E402
from medmetric.datamodules.images import load_rgb  # noqa: E402
from medmetric.datamodules.synthetic import write_ham10000  # noqa: E402
from medmetric.datamodules.transforms import build_transform  # noqa: E402

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ham10000"


def image_paths(data_dir: Path | None, n: int, work: Path) -> tuple[list[str], str]:
    if data_dir is None and (REAL / "HAM10000_metadata.csv").is_file():
        data_dir = REAL
    if data_dir is None:
        data_dir = write_ham10000(work / "ham10000", n_images=n, seed=0)
        source = f"generated HAM10000-format set ({n} images)"
    else:
        source = str(data_dir)
    paths = sorted(str(p) for p in (Path(data_dir) / "images").rglob("*.jpg"))[:n]
    if not paths:
        sys.exit(f"no .jpg images under {data_dir}/images")
    with_size = load_rgb(paths[0]).shape
    return paths, f"{source}: {len(paths)} JPEGs, first {with_size[1]}x{with_size[0]}"


def rate(fetch, n: int, repeats: int = 2) -> float:
    """Best images/s over ``repeats`` passes (the first pass also warms the page cache)."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(n):
            fetch(i)
        best = max(best, n / (time.perf_counter() - start))
    return best


def measure(paths: list[str], sizes: list[int], cache_dir: Path) -> list[tuple]:
    targets = np.zeros(len(paths), dtype=np.int64)
    rows = []
    for size in sizes:
        start = time.perf_counter()
        cache = open_image_cache(paths, size, cache_dir, workers=2)
        build = time.perf_counter() - start
        min_side = stored_min_side(size)
        rows.append((size, "fetch only (decode+shrink vs read)", rate(lambda i, m=min_side: load_rgb(paths[i], m), len(paths)),
                     rate(lambda i, c=cache: c[i], len(paths))))
        for preset in ("dermoscopy", "none"):
            transform = build_transform(preset, size)
            decoded = ImageDataset(paths, targets, transform)
            cached = ImageDataset(paths, targets, transform, images=cache)
            rows.append((size, f"__getitem__ + {preset} transform", rate(decoded.__getitem__, len(paths)), rate(cached.__getitem__, len(paths))))
        print(f"cache build at {size} px (shorter side {min_side}): {build:.1f} s for {len(paths)} images "
              f"({len(paths) / build:.0f} img/s, once)")
    return rows


def print_table(title: str, rows: list[tuple]) -> None:
    print(f"\n{title}\n")
    print("| size | path | decode JPEG each time (img/s) | image cache (img/s) | cache / decode |")
    print("|---:|---|---:|---:|---:|")
    for size, what, decode, cached in rows:
        print(f"| {size} | {what} | {decode:,.0f} | {cached:,.0f} | {cached / decode:.1f}x |")


def full_resolution_copies(paths: list[str], folder: Path, size=(600, 450)) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True)
    out = []
    for p in paths:
        target = folder / Path(p).name
        with Image.open(p) as img:
            img.convert("RGB").resize(size, Image.BICUBIC).save(target, quality=90)
        out.append(str(target))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1500, help="images read per pass")
    parser.add_argument("--full_res_n", type=int, default=500, help="images re-encoded at 600x450 (0: skip)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--data_dir", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths, source = image_paths(args.data_dir, args.n, work)
        print(f"data: {source}; one process, num_workers=0; best of 2 passes")
        tables = [(f"{source}", measure(paths, args.sizes, work / "cache"))]
        if args.full_res_n:
            big = full_resolution_copies(paths[: args.full_res_n], work / "full_res")
            tables.append((f"the first {len(big)} of them re-encoded at 600x450 (HAM10000 release resolution)",
                           measure(big, args.sizes, work / "cache_full")))
        for title, rows in tables:
            print_table(title, rows)


if __name__ == "__main__":
    main()
