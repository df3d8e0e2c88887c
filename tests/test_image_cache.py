"""The preprocessed image cache: contents, staleness, concurrent builds, DataModule use.

References: every cached image must equal ``load_rgb(path, min_side)`` -- the in-RAM preload's
decoding -- pixel for pixel; a rebuilt cache must equal the new file's decoding.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from medmetric.datamodules.cache import open_image_cache, stored_min_side
from medmetric.datamodules.images import load_rgb
from tests.conftest import REPO

SIZES = [(200, 150), (150, 200), (64, 64), (90, 40), (33, 47)]  # (width, height): mixed aspect ratios


def write_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        path = folder / f"img{i:04d}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_cached_pixels_equal_preload_decoding_for_every_aspect_ratio(tmp_path):
    paths = write_images(tmp_path / "src", 10)
    images = open_image_cache(paths, image_size=32, cache_dir=tmp_path / "cache")
    assert images.built_here and len(images) == 10
    min_side = stored_min_side(32)
    assert min_side >= 32
    for i, path in enumerate(paths):
        expected = load_rgb(path, min_side)
        assert min(expected.shape[:2]) == min_side
        np.testing.assert_array_equal(images[i], expected)
    subset = images.take([3, 1])  # a split's view of the same file
    np.testing.assert_array_equal(subset[0], load_rgb(paths[3], min_side))
    np.testing.assert_array_equal(subset[1], load_rgb(paths[1], min_side))
    clone = pickle.loads(pickle.dumps(subset))  # DataLoader workers get it without the mapped file
    assert len(pickle.dumps(subset)) < 2000
    np.testing.assert_array_equal(clone[1], subset[1])


def test_reused_when_fresh_rebuilt_when_a_file_is_touched_or_replaced(tmp_path):
    paths = write_images(tmp_path / "src", 6)
    cache = tmp_path / "cache"
    assert open_image_cache(paths, 32, cache).built_here
    again = open_image_cache(paths, 32, cache)
    assert not again.built_here

    os.utime(paths[2], ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: new mtime, same bytes
    touched = open_image_cache(paths, 32, cache)
    assert touched.built_here
    np.testing.assert_array_equal(touched[2], load_rgb(paths[2], stored_min_side(32)))

    Image.fromarray(np.full((80, 120, 3), 7, dtype=np.uint8)).save(paths[4], format="PNG")  # replaced
    replaced = open_image_cache(paths, 32, cache)
    assert replaced.built_here
    np.testing.assert_array_equal(replaced[4], load_rgb(paths[4], stored_min_side(32)))
    assert replaced[4].shape == (37, 56, 3) and (replaced[4] == 7).all()
    assert not open_image_cache(paths, 32, cache).built_here
    assert open_image_cache(paths, 64, cache).built_here  # another target size is another cache
    assert len(list(cache.glob("*.u8"))) == 2 and not list(cache.glob(".*tmp*"))  # rebuilt in place, no leftovers


BUILDER = """
import json, sys, time
from pathlib import Path
from medmetric.datamodules.cache import open_image_cache
paths, cache, go = json.loads(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
while not go.exists():
    time.sleep(0.005)
images = open_image_cache(paths, 64, cache, workers=1)
print(json.dumps({"built": images.built_here, "sum": int(sum(int(images[i].sum()) for i in range(len(images))))}))
"""


def test_two_processes_opening_at_once_build_once_and_read_the_same(tmp_path):
    paths = write_images(tmp_path / "src", 150)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", BUILDER, json.dumps(paths), str(tmp_path / "cache"), str(go)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    time.sleep(1.0)  # both are waiting for the go file
    go.touch()
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(o["built"] for o in outputs) == [False, True]
    expected = sum(int(load_rgb(p, stored_min_side(64)).sum()) for p in paths)
    assert [o["sum"] for o in outputs] == [expected, expected]


def test_datamodule_serves_the_same_samples_from_the_cache(ham_root, tmp_path):
    from medmetric.datamodules.skin import HAM10000DataModule

    common = {"data_dir": str(ham_root), "image_size": 32, "batch_size": 16, "num_workers": 0, "augment": "none"}
    cached = HAM10000DataModule(**common, image_cache_dir=str(tmp_path / "cache"))
    preloaded = HAM10000DataModule(**common, preload=True)
    cached.setup("fit")
    preloaded.setup("fit")
    for split in ("train", "val", "test"):
        a, b = cached.datasets[split], preloaded.datasets[split]
        assert type(a.images).__name__ == "CachedImages" and len(a) == len(b)
        for i in (0, len(a) // 2, len(a) - 1):
            xa, ya = a[i]
            xb, yb = b[i]
            assert ya == yb
            assert np.array_equal(xa.numpy(), xb.numpy())
