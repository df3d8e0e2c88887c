"""A DataLoader worker killed mid-epoch (as the OOM killer does): the run fails loudly, is marked
FAILED, keeps its last good checkpoint, and ``--ckpt_path last`` finishes it in the same folder."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_resume import BATCHES_PER_EPOCH, fit, steps

pytestmark = pytest.mark.slow


def test_killed_dataloader_worker_fails_the_run_and_resume_finishes_it(ham_root, tmp_path):
    runs, log = tmp_path / "runs", tmp_path / "steps.jsonl"
    crashed = fit(ham_root, runs, log, "--data.num_workers=1",
                  "--trainer.callbacks+=tests.resume.probes.KillDataWorkerAt",
                  "--trainer.callbacks.epoch=1", "--trainer.callbacks.batch=1")
    assert crashed.returncode not in (0, -9), crashed.stderr[-2000:]  # an error exit, not a silent one
    assert "DataLoader worker" in crashed.stderr
    (run,) = (runs / "resume" / "stage1").iterdir()
    assert "DataLoader worker" in (run / "FAILED").read_text()
    assert not (run / "results.json").exists()
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (0, BATCHES_PER_EPOCH)  # the end of epoch 0, intact

    resumed = fit(ham_root, runs, log, "--data.num_workers=1", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [p.name for p in (runs / "resume" / "stage1").iterdir()] == [run.name]  # continued in place
    assert (run / "results.json").is_file() and not (run / "FAILED").exists()
    (segment,) = (run / "resumes").iterdir()
    record = json.loads((segment / "resume.json").read_text())
    assert "DataLoader worker" in record["previous_failure"]
    assert (segment / "FAILED.before-resume").is_file()  # the failure is kept with the segment it ended
    epoch1 = [(s["step"], s["batch_idx"]) for s in steps(log) if s["epoch"] == 1]
    # epoch 1 was started, broke, and was trained again in full from the end-of-epoch-0 checkpoint
    assert epoch1[-BATCHES_PER_EPOCH:] == [(BATCHES_PER_EPOCH + i, i) for i in range(BATCHES_PER_EPOCH)]
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (final["epoch"], final["global_step"]) == (1, 2 * BATCHES_PER_EPOCH)
