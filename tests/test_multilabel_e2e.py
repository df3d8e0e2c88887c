"""Multi-label chest X-ray runs through the real CLI on the synthetic ChestX-ray14:
baseline (stage 1) -> re-balanced head (stage 2), and a GZSL baseline.

Checks what a user relies on: the checkpoint is picked on val/mean_auroc, results.json holds
test AUROCs that sklearn reproduces from the saved checkpoint, the stage-2 backbone is the
stage-1 one bit for bit, and GZSL runs report seen/unseen/harmonic AUROC.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from medmetric.datamodules.chest_xray import CHESTXRAY14_LABELS, ChestXray14DataModule
from medmetric.experiments.cli import main
from medmetric.lightning_modules.multilabel_pretrain import MultiLabelPretrainModule

pytestmark = pytest.mark.slow

TINY = [
    "--model.backbone=test_resnet", "--data.image_size=32", "--data.batch_size=16", "--data.num_workers=0",
    "--data.val_fraction=0.2", "--trainer.max_epochs=2", "--trainer.limit_train_batches=4", "--wandb=disabled",
]
UNSEEN = ["Edema", "Pneumonia", "Emphysema", "Fibrosis"]


def only_run(stage_dir: Path) -> Path:
    (run,) = sorted(p for p in stage_dir.iterdir() if p.is_dir())
    return run


@pytest.fixture(scope="module")
def two_stage(chestxray14_root, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    common = [f"--data.data_dir={chestxray14_root}", f"--runs_dir={runs}", "--experiment=cxr"]
    main(["fit", "--config", "experiments/chestxray14/baseline.yaml", *common, *TINY])
    main(["fit", "--config", "experiments/chestxray14/stage2.yaml", *common, *TINY[1:], "--model.loss=class_balanced_bce"])
    return runs, only_run(runs / "cxr" / "stage1"), only_run(runs / "cxr" / "stage2")


def test_baseline_results_match_sklearn_on_the_chosen_checkpoint(two_stage, chestxray14_root):
    runs, stage1, _ = two_stage
    results = json.loads((stage1 / "results.json").read_text())
    manifest = json.loads((runs / "cxr" / "handoff.json").read_text())
    assert manifest["selected_on"]["monitor"] == "val/mean_auroc"
    assert manifest["projector_weights"] is None and manifest["head_weights"] == "stage1/" + stage1.name + "/head.pt"
    assert results["task"] == "multilabel" and results["class_names"] == list(CHESTXRAY14_LABELS)
    model = MultiLabelPretrainModule.load_from_checkpoint(results["checkpoint"], map_location="cpu").eval()
    dm = ChestXray14DataModule(str(chestxray14_root), image_size=32, num_workers=0, split_file=str(runs / "cxr" / "split.csv"))
    dm.setup()
    with torch.no_grad():
        batches = [(model(x), y) for x, y in dm.test_dataloader()]
    scores, targets = (torch.cat(t).numpy() for t in zip(*batches, strict=True))
    expected = [roc_auc_score(targets[:, c], scores[:, c]) for c in range(14)]
    metrics = results["metrics"]
    for c, name in enumerate(CHESTXRAY14_LABELS):
        assert metrics[f"auroc/{name}"] == pytest.approx(expected[c], abs=1e-5)
    assert metrics["mean_auroc"] == pytest.approx(np.mean(expected), abs=1e-5)
    thresholds = model.f1_thresholds.numpy()
    for c, name in enumerate(CHESTXRAY14_LABELS):  # F1 uses the thresholds chosen on validation
        if not math.isnan(thresholds[c]):
            predicted = scores[:, c] >= thresholds[c]
            f1 = 2 * (predicted & (targets[:, c] == 1)).sum() / (predicted.sum() + targets[:, c].sum())
            assert metrics[f"f1/{name}"] == pytest.approx(f1, abs=1e-6)
            assert results["f1_thresholds"][name] == pytest.approx(thresholds[c])


def test_stage2_keeps_the_backbone_and_trains_a_new_head(two_stage):
    _, stage1, stage2 = two_stage
    results = json.loads((stage2 / "results.json").read_text())
    assert results["stage"] == "stage2" and results["model"] == "MultiLabelHeadModule"
    assert 0 <= results["metrics"]["mean_auroc"] <= 1
    stage1_backbone = torch.load(stage1 / "backbone.pt", weights_only=True)
    state = torch.load(results["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    for key, value in stage1_backbone.items():
        assert torch.equal(state[f"backbone.{key}"], value), key  # weights and BatchNorm statistics
    stage1_head = torch.load(stage1 / "head.pt", weights_only=True)
    assert not torch.equal(state["head.weight"], stage1_head["weight"])


def test_gzsl_baseline_reports_seen_unseen_harmonic(chestxray14_root, tmp_path):
    args = [f"--data.data_dir={chestxray14_root}", f"--runs_dir={tmp_path}", "--experiment=gzsl", *TINY]
    main(["fit", "--config", "experiments/chestxray14/baseline.yaml", *args, "--trainer.max_epochs=1", f"--data.unseen_labels={json.dumps(UNSEEN)}"])
    results = json.loads((only_run(tmp_path / "gzsl" / "stage1") / "results.json").read_text())
    assert results["unseen_labels"] == [n for n in CHESTXRAY14_LABELS if n in UNSEEN]
    metrics = results["metrics"]
    seen = np.mean([metrics[f"auroc/{n}"] for n in CHESTXRAY14_LABELS if n not in UNSEEN])
    unseen = np.mean([metrics[f"auroc/{n}"] for n in UNSEEN])
    assert metrics["seen_auroc"] == pytest.approx(seen, abs=1e-6)
    assert metrics["unseen_auroc"] == pytest.approx(unseen, abs=1e-6)
    assert metrics["harmonic_auroc"] == pytest.approx(2 * seen * unseen / (seen + unseen), abs=1e-6)
    assert all(math.isnan(results["f1_thresholds"][n]) for n in UNSEEN)  # never tuned on unseen labels
