"""DDP on CPU: 2 gloo processes, each run in a subprocess (two DDP runs in one process collide).

1. Gradient parity: the gathered metric loss, averaged over 2 ranks x B, has the gradient of one
   process on the 2B batch (to 1e-5), loss-owned weights included; without the gradient scale
   it does not (a control that shows the check can fail).
2. A 2-process stage-1 fit through the CLI: every rank saw P x M batches, disjoint from the
   other rank's, and the manifest and results were written once.
"""

from __future__ import annotations

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


def test_two_process_stage1_fit_keeps_p_x_m_batches(ham_root, tmp_path):
    record = tmp_path / "record"
    command = [
        sys.executable, "-m", "experiments", "fit", "--config", "experiments/ham10000/stage1.yaml",
        f"--data.data_dir={ham_root}", f"--runs_dir={tmp_path / 'runs'}", "--experiment=ddp",
        "--model.backbone=test_resnet", "--data.image_size=32", "--data.batch_size=16", "--data.m_per_class=4",
        "--data.preload=false", "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--wandb=disabled",
        "--trainer.callbacks+=tests.ddp.recorder.BatchRecorder", f"--trainer.callbacks.out_dir={record}",
    ]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
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
