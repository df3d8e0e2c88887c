"""Shared fixtures: tiny generated data sets in the real on-disk formats, and the real data path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "disabled")  # tests that check W&B unset it themselves

from medmetric.datamodules.synthetic import write_chestxray14, write_ham10000, write_isic2019  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REAL_HAM10000 = REPO.parent / "shared" / "data" / "ham10000"


@pytest.fixture(scope="session")
def ham_root(tmp_path_factory) -> Path:
    """A read-only-by-convention synthetic HAM10000 (300 images); copy it before changing it."""
    return write_ham10000(tmp_path_factory.mktemp("ham") / "ham10000", n_images=300, seed=0)


@pytest.fixture(scope="session")
def isic_root(tmp_path_factory) -> Path:
    return write_isic2019(tmp_path_factory.mktemp("isic") / "isic2019", n_images=300, seed=0)


@pytest.fixture(scope="session")
def chestxray14_root(tmp_path_factory) -> Path:
    """A synthetic ChestX-ray14 (100 patients, ~220 gray 64 px PNGs, images_00*/images layout,
    some images with only GZSL-unseen findings); copy it before changing it."""
    return write_chestxray14(tmp_path_factory.mktemp("cxr") / "chestxray14", n_patients=100, seed=0)


@pytest.fixture
def ham_copy(ham_root, tmp_path) -> Path:
    """A private copy of the synthetic HAM10000 that a test may damage."""
    return Path(shutil.copytree(ham_root, tmp_path / "ham10000"))


@pytest.fixture
def isic_copy(isic_root, tmp_path) -> Path:
    return Path(shutil.copytree(isic_root, tmp_path / "isic2019"))


def make_stage1_handoff(folder: Path, class_names, counts=None, backbone: str = "test_resnet") -> Path:
    """A handoff manifest from an untrained stage-1 model (for stage-2 unit tests)."""
    from medmetric.callbacks.handoff import stage1_manifest
    from medmetric.lightning_modules.metric_pretrain import MetricPretrainModule
    from medmetric.run_io.manifest import write_manifest

    stage1 = MetricPretrainModule(list(class_names), backbone=backbone, embedding_dim=16)
    counts = counts or [10] * len(class_names)
    write_manifest(folder / "handoff.json", stage1_manifest(folder, stage1, stage1.state_dict(), counts, "x"))
    return folder / "handoff.json"


def require_real_ham10000() -> Path:
    if not (REAL_HAM10000 / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"real HAM10000 not found at {REAL_HAM10000} (../shared/data/ham10000)")
    return REAL_HAM10000
