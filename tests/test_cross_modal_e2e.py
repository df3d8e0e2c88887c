"""Cross-modal stage 1 -> re-balanced multi-label head (stage 2), and the GZSL run, through the CLI.

Uses a tiny random BERT folder as the text encoder (no model download or load of MiniLM here).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medmetric.datamodules.chest_xray import CHESTXRAY14_LABELS, DEFAULT_UNSEEN
from medmetric.experiments.cli import main
from medmetric.experiments.gzsl_table import blob_basis, text_codes, write_text_tied_chestxray14
from tests.test_text_embeddings import write_tiny_text_encoder

pytestmark = pytest.mark.slow

TINY = [
    "--model.backbone=test_resnet",
    "--data.image_size=32",
    "--data.batch_size=32",
    "--data.num_workers=0",
    "--data.augment=none",
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=3",
    "--trainer.log_every_n_steps=1",
    "--wandb=disabled",
]


def only_run(stage_dir: Path) -> Path:
    runs = sorted(p for p in stage_dir.iterdir() if p.is_dir())
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def text_args(tmp_path_factory):
    folder = tmp_path_factory.mktemp("encoder")
    encoder = write_tiny_text_encoder(folder / "tiny-bert")
    return [f"--model.text_encoder={encoder}", f"--model.text_cache_dir={folder / 'cache'}"]


def test_cross_modal_stage1_then_rebalanced_head_stage2(chestxray14_root, tmp_path, text_args):
    common = [f"--data.data_dir={chestxray14_root}", f"--runs_dir={tmp_path}", "--experiment=cm"]
    main(["fit", "--config", "experiments/chestxray14/cross_modal_stage1.yaml", *common, *TINY, *text_args,
          "--model.loss=dual_weighted_metric", "--model.loss_kwargs={temperature: 0.5}"])
    stage1 = only_run(tmp_path / "cm" / "stage1")
    manifest = json.loads((tmp_path / "cm" / "handoff.json").read_text())
    assert manifest["backbone"]["name"] == "test_resnet" and manifest["embedding_dim"] == 16
    assert manifest["class_names"] == list(CHESTXRAY14_LABELS)
    assert manifest["selected_on"]["monitor"] == "val/mean_auroc"
    stage1_results = json.loads((stage1 / "results.json").read_text())
    assert stage1_results["model"] == "CrossModalModule" and 0 <= stage1_results["metrics"]["mean_auroc"] <= 1
    backbone = torch.load(stage1 / "backbone.pt", weights_only=True)

    main(["fit", "--config", "experiments/chestxray14/stage2.yaml", *common, *TINY[1:]])
    stage2 = only_run(tmp_path / "cm" / "stage2")
    state = torch.load(stage2 / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key, value in backbone.items():  # stage 2 trains the head only, on the cross-modal backbone
        torch.testing.assert_close(state[f"backbone.{key}"], value, rtol=0, atol=0)
    metrics = json.loads((stage2 / "results.json").read_text())["metrics"]
    assert 0 <= metrics["mean_auroc"] <= 1 and "auroc/Hernia" in metrics


def test_gzsl_run_reports_seen_unseen_and_harmonic_auroc(chestxray14_root, tmp_path, text_args):
    main(["fit", "--config", "experiments/chestxray14/gzsl.yaml", f"--data.data_dir={chestxray14_root}",
          f"--runs_dir={tmp_path}", "--experiment=gzsl", *TINY, *text_args])
    results = json.loads((only_run(tmp_path / "gzsl" / "stage1") / "results.json").read_text())
    metrics = results["metrics"]
    unseen = [CHESTXRAY14_LABELS.index(n) for n in DEFAULT_UNSEEN]
    assert [results["train_class_counts"][i] for i in unseen] == [0, 0, 0, 0]
    seen_values = [metrics[f"auroc/{n}"] for n in CHESTXRAY14_LABELS if n not in DEFAULT_UNSEEN and f"auroc/{n}" in metrics]
    unseen_values = [metrics[f"auroc/{n}"] for n in DEFAULT_UNSEEN]  # every unseen label is scored
    s, u = metrics["seen_auroc"], metrics["unseen_auroc"]
    assert s == pytest.approx(np.mean(seen_values), abs=1e-6) and u == pytest.approx(np.mean(unseen_values), abs=1e-6)
    assert metrics["harmonic_auroc"] == pytest.approx(2 * s * u / (s + u), abs=1e-6)
    assert all(math.isfinite(v) for v in (s, u))


def test_text_tied_synthetic_images_carry_each_labels_text_code(tmp_path):
    """The GZSL table's data: an image minus the background is the sum of its findings' codes."""
    vectors = torch.randn(14, 12, generator=torch.Generator().manual_seed(0))
    root = write_text_tied_chestxray14(tmp_path / "tied", vectors, n_patients=150, image_size=24, n_codes=4)
    table = pd.read_csv(root / "Data_Entry_2017.csv")
    assert (root / "test_list.txt").is_file() and len(list(root.glob("images*/**/*.png"))) == len(table)
    codes = text_codes(vectors, 4)
    # PCA codes: centred projections, scaled to max |.| = 1, and ordered by explained variance
    assert np.abs(codes).max() == pytest.approx(1.0) and np.allclose(codes.mean(0), 0, atol=1e-9)
    assert codes[:, 0].var() >= codes[:, 1].var() >= codes[:, 3].var()
    # regress pixels on the multi-hot targets: the per-label patterns come out ~ codes @ basis,
    # so labels with near codes have near patterns (what makes zero-shot possible)
    files = {p.name: p for p in root.glob("images*/**/*.png")}
    X = np.stack([np.asarray(Image.open(files[n]), dtype=np.float64).ravel() / 255 for n in table["Image Index"]])
    Y = np.array([[lab in f.split("|") for lab in CHESTXRAY14_LABELS] for f in table["Finding Labels"]], dtype=np.float64)
    design = np.hstack([Y, np.ones((len(Y), 1))])
    patterns = np.linalg.lstsq(design, X, rcond=None)[0][:14]
    expected = 0.25 * (codes @ blob_basis(4, 24).reshape(4, -1))
    for c in range(14):
        if Y[:, c].sum() >= 8:
            assert np.corrcoef(patterns[c], expected[c])[0, 1] > 0.8, CHESTXRAY14_LABELS[c]
