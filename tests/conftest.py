"""Shared fixtures: tiny generated data sets in the real on-disk formats, and the real data path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

from datamodules.synthetic import write_ham10000, write_isic2019  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REAL_HAM10000 = REPO.parent / "shared" / "data" / "ham10000"


@pytest.fixture(scope="session")
def ham_root(tmp_path_factory) -> Path:
    """A read-only-by-convention synthetic HAM10000 (300 images); copy it before changing it."""
    return write_ham10000(tmp_path_factory.mktemp("ham") / "ham10000", n_images=300, seed=0)


@pytest.fixture(scope="session")
def isic_root(tmp_path_factory) -> Path:
    return write_isic2019(tmp_path_factory.mktemp("isic") / "isic2019", n_images=300, seed=0)


@pytest.fixture
def ham_copy(ham_root, tmp_path) -> Path:
    """A private copy of the synthetic HAM10000 that a test may damage."""
    return Path(shutil.copytree(ham_root, tmp_path / "ham10000"))


@pytest.fixture
def isic_copy(isic_root, tmp_path) -> Path:
    return Path(shutil.copytree(isic_root, tmp_path / "isic2019"))


def require_real_ham10000() -> Path:
    if not (REAL_HAM10000 / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"real HAM10000 not found at {REAL_HAM10000} (../shared/data/ham10000)")
    return REAL_HAM10000
