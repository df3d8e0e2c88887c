"""DDP on CPU: 2 gloo processes, each run in a subprocess (two DDP runs in one process collide).

1. Gradient parity: the gathered metric loss, averaged over 2 ranks x B, has the gradient of one
   process on the 2B batch (to 1e-5), loss-owned weights included; without the gradient scale
   it does not (a control that shows the check can fail).
2. A 2-process stage-1 fit through the CLI: every rank saw P x M batches, disjoint from the
   other rank's, and the manifest and results were written once.
3. A 2-process stage-2 fit (cRT, class-balanced sampler, feature cache) on that manifest: every
   rank loaded the same manifest and the same cached features (written once), its batches are
   class-balanced, and the synced test metrics count each test image once.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def test_gathered_loss_gradient_equals_single_process_gradient(tmp_path):
    out = tmp_path / "parity.json"
    subprocess.run([sys.executable, "-m", "tests.ddp.grad_parity", str(out)], cwd=REPO, env=ENV, check=True, timeout=300)
    report = json.loads(out.read_text())
    control = report.pop("control_unscaled")
    assert control["max_grad_diff"] > 1e-3, "the unscaled gather should not match: the check is blind"
    assert set(report) >= {"supcon", "triplet", "multi_similarity", "arcface", "class_center_triplet"}
    for name, result in report.items():
        assert result["value_diff"] < 1e-5, name
        assert result["max_grad_diff"] < 1e-5, (name, result)
    assert "loss.loss.W" in report["arcface"]["params"] and "loss.centers" in report["class_center_triplet"]["params"]


@pytest.fixture(scope="module")
def stage1_ddp(ham_root, tmp_path_factory):
    """One 2-process stage-1 fit through the CLI, shared by the stage-1 and stage-2 checks."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    record = tmp_path / "record"
    command = [
        sys.executable, "-m", "medmetric.experiments", "fit", "--config", "experiments/ham10000/stage1.yaml",
        f"--data.data_dir={ham_root}", f"--runs_dir={tmp_path / 'runs'}", "--experiment=ddp",
        "--model.backbone=test_resnet", "--data.image_size=32", "--data.batch_size=16", "--data.m_per_class=4",
        "--data.preload=false", "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
        "--config", "experiments/trainer/ddp_cpu.yaml", "--wandb=disabled",
        "--allow_class_paths=tests.ddp.recorder", "--trainer.callbacks+=tests.ddp.recorder.BatchRecorder", f"--trainer.callbacks.out_dir={record}",
    ]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path, record


def test_two_process_stage1_fit_keeps_p_x_m_batches(stage1_ddp):
    tmp_path, record = stage1_ddp
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 3
    for rank in ranks:
        for batch in rank["batches"]:
            assert len(batch) == 16 and set(Counter(batch).values()) == {4}, batch  # P=4 classes x M=4
    runs = list((tmp_path / "runs" / "ddp" / "stage1").iterdir())
    assert len(runs) == 1, f"all ranks must share one run folder, got {runs}"
    assert (runs[0] / "handoff.json").is_file() and (runs[0] / "results.json").is_file()
    manifest = json.loads((tmp_path / "runs" / "ddp" / "handoff.json").read_text())
    results = json.loads((runs[0] / "results.json").read_text())
    split_test = sum(1 for line in (tmp_path / "runs" / "ddp" / "split.csv").read_text().splitlines() if line.endswith(",test"))
    assert sum(map(sum, results["confusion_matrix"])) == split_test  # each test image counted once
    checkpoint = (tmp_path / "runs" / "ddp" / manifest["checkpoint"]).resolve()
    assert checkpoint.is_file() and checkpoint.parent == (runs[0] / "checkpoints").resolve()


def test_two_process_stage2_fit_reads_one_manifest_and_one_feature_cache(stage1_ddp, ham_root):
    tmp_path, _ = stage1_ddp
    record = tmp_path / "record2"
    command = [
        sys.executable, "-m", "medmetric.experiments", "fit", "--config", "experiments/ham10000/stage2.yaml",
        "--config", "experiments/trainer/ddp_cpu.yaml", f"--data.data_dir={ham_root}", f"--runs_dir={tmp_path / 'runs'}",
        "--experiment=ddp", "--data.image_size=32", "--data.batch_size=16", "--data.preload=false",
        "--data.augment=none", "--model.feature_cache=true", "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
        "--wandb=disabled", "--allow_class_paths=tests.ddp.recorder", "--trainer.callbacks+=tests.ddp.recorder.BatchRecorder", f"--trainer.callbacks.out_dir={record}",
    ]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    experiment = tmp_path / "runs" / "ddp"
    manifest = json.loads((experiment / "handoff.json").read_text())
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # one manifest, read by every rank
    assert [r["manifest_weights_sha256"] for r in ranks] == [manifest["backbone_weights_sha256"]] * 2
    # one feature cache file (no leftovers), and every rank trained on exactly those features
    cache_files = list((experiment / "feature_cache").iterdir())
    assert len(cache_files) == 1 and cache_files[0].suffix == ".pt", cache_files
    import torch

    cached = torch.load(cache_files[0], weights_only=True)["train"]["features"]
    expected = hashlib.sha256(cached.numpy().tobytes()).hexdigest()
    assert [(r["train_dataset"], r["features_sha256"]) for r in ranks] == [("FeatureDataset", expected)] * 2
    # class-balanced batches: the 7 classes about equally often (instance sampling: nv ~ 2/3)
    draws = Counter(c for r in ranks for batch in r["batches"] for c in batch)
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 3 and sum(draws.values()) == 2 * 3 * 16
    assert max(draws.values()) / sum(draws.values()) < 0.3, draws
    # results written once; test metrics synced over ranks with each test image counted once
    (run,) = list((experiment / "stage2").iterdir())
    assert [p.name for p in run.glob("results*.json")] == ["results.json"]
    results = json.loads((run / "results.json").read_text())
    split_test = sum(1 for line in (experiment / "split.csv").read_text().splitlines() if line.endswith(",test"))
    assert sum(map(sum, results["confusion_matrix"])) == split_test
