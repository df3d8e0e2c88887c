"""X-ray decoding: 8-bit gray, 16-bit gray (rescaled, not clipped), RGB, RGBA and LA (alpha
dropped), checked on generated files against hand-computed values; and the CXR preset."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
from PIL import Image

from medmetric.datamodules.images import ImageReadError
from medmetric.datamodules.transforms import PRESETS, build_transform
from medmetric.datamodules.xray_images import load_xray, to_channels


def test_8bit_gray_is_read_unchanged(tmp_path):
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(pixels, "L").save(tmp_path / "g.png")
    assert np.array_equal(load_xray(tmp_path / "g.png"), pixels)


def test_16bit_png_is_rescaled_over_its_full_range(tmp_path):
    values = np.array([[0, 257, 32896, 65535], [128, 385, 65280, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as img:
        assert img.mode.startswith("I")  # really a 16-bit file
    # round(v * 255 / 65535): 0, 1, 128, 255 / 0 (0.498), 1 (1.498), 254, 4 (3.89)
    expected = np.array([[0, 1, 128, 255], [0, 1, 254, 4]], dtype=np.uint8)
    assert np.array_equal(load_xray(tmp_path / "g16.png"), expected)


def test_rgba_and_la_drop_alpha(tmp_path):
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    alpha = np.full((4, 4, 1), 7, dtype=np.uint8)  # nearly transparent: must not darken the image
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA").save(tmp_path / "rgba.png")
    luma = round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)  # ITU-R 601 = 124
    assert np.all(load_xray(tmp_path / "rgba.png") == luma)
    gray_alpha = np.stack([np.full((4, 4), 90, np.uint8), np.full((4, 4), 3, np.uint8)], axis=2)
    Image.fromarray(gray_alpha, "LA").save(tmp_path / "la.png")
    assert np.all(load_xray(tmp_path / "la.png") == 90)


def test_channels_and_errors(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert to_channels(gray, 1).shape == (3, 4, 1)
    three = to_channels(gray, 3)
    assert three.shape == (3, 4, 3) and all(np.array_equal(three[..., k], gray) for k in range(3))
    with pytest.raises(ValueError, match="data.in_chans"):
        to_channels(gray, 2)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match="bad.png"):
        load_xray(tmp_path / "bad.png")


def test_cxr_preset_never_flips_and_keeps_size():
    kinds = {type(t) for t in PRESETS["cxr"](32)}
    assert not kinds & {A.HorizontalFlip, A.VerticalFlip, A.Transpose, A.RandomRotate90}
    transform = build_transform("cxr", 32, mean=(0.5,), std=(0.25,))
    out = transform(image=np.full((50, 40, 1), 128, np.uint8))["image"]
    assert tuple(out.shape) == (1, 32, 32)
