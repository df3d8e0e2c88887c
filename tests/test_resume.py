"""Resume and preemption through the real CLI, each fit in its own process.

A reference fit runs uninterrupted. Another identical fit is killed (SIGKILL, nothing saved on
the way out) in the middle of epoch 1 and continued with ``--ckpt_path last`` from the end-of-epoch
``last.ckpt``; a third gets SIGTERM in the middle of epoch 0, saves ``last.ckpt`` there and exits 0,
and is continued the same way. Both continuations must train on exactly the reference's
batches (same epoch, global step and sampler plan per batch) and end with bit-identical weights
and identical test results; the finished reference run is never touched.

The same holds with augmentation on (``augment=dermoscopy``): a SIGTERM mid-epoch run with two
persistent DataLoader workers, resumed, trains on the pixel-identical augmented batches of an
uninterrupted run without workers (augmentation is seeded per (data.seed, epoch, index)).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
BATCHES_PER_EPOCH = 4


def fit(ham_root: Path, runs: Path, log: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "medmetric.experiments", "fit", "--config", "experiments/ham10000/stage1.yaml",
        "--config", "experiments/trainer/cpu.yaml", f"--data.data_dir={ham_root}", f"--runs_dir={runs}",
        "--experiment=resume", "--wandb=disabled", "--model.backbone=test_resnet", "--data.image_size=32",
        "--data.batch_size=16", "--data.m_per_class=4", "--data.augment=none", "--data.preload=false",
        "--data.num_workers=0", "--trainer.max_epochs=2", f"--trainer.limit_train_batches={BATCHES_PER_EPOCH}",
        "--trainer.limit_val_batches=2", "--seed_everything=7",
        "--allow_class_paths=tests.resume.probes", "--trainer.callbacks+=tests.resume.probes.StepLog", f"--trainer.callbacks.path={log}", *extra,
    ]
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def steps(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def results_of(run: Path) -> dict:
    results = json.loads((run / "results.json").read_text())
    results["checkpoint"] = Path(results["checkpoint"]).name  # the same best epoch, in its own run folder
    return {k: v for k, v in results.items() if k != "run_dir"}


@pytest.fixture(scope="module")
def reference(ham_root, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    log = runs / "reference.jsonl"
    done = fit(ham_root, runs, log)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (runs / "resume" / "stage1").iterdir()
    snapshot = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    return runs, run, steps(log), snapshot


def only_new_run(runs: Path, reference_run: Path) -> Path:
    (run,) = [p for p in (runs / "resume" / "stage1").iterdir() if p != reference_run]
    return run


def assert_same_as_reference(run: Path, log: Path, reference) -> None:
    _, reference_run, reference_steps, snapshot = reference
    assert steps(log) == reference_steps  # same epoch, step, batch index and sampled classes per batch
    ours, theirs = final_weights(run), final_weights(reference_run)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    assert results_of(run) == results_of(reference_run)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (reference_run / "checkpoints").iterdir())  # no last-v1.ckpt beside
    # the finished reference run was left alone
    assert {p.relative_to(reference_run): p.stat().st_mtime_ns for p in reference_run.rglob("*") if p.is_file()} == snapshot


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(ham_root, reference, tmp_path):
    runs = reference[0]
    log = tmp_path / "killed.jsonl"
    killed = fit(ham_root, runs, log, "--trainer.callbacks+=tests.resume.probes.SignalAt",
                 "--trainer.callbacks.epoch=1", "--trainer.callbacks.batch=2", "--trainer.callbacks.signal_name=SIGKILL")
    assert killed.returncode == -9, killed.stderr[-2000:]
    run = only_new_run(runs, reference[1])
    assert not (run / "results.json").exists()
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (0, BATCHES_PER_EPOCH)  # the end of epoch 0
    # the batches trained after that checkpoint are lost with the process, and trained again
    trained = [s for s in steps(log) if s["step"] < BATCHES_PER_EPOCH]
    log.write_text("".join(json.dumps(s) + "\n" for s in trained))

    resumed = fit(ham_root, runs, log, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert only_new_run(runs, reference[1]) == run, "--ckpt_path last continues the interrupted run folder"
    (segment,) = (run / "resumes").iterdir()
    record = json.loads((segment / "resume.json").read_text())
    assert record["continued_in_place"] and (record["epoch"], record["global_step"]) == (0, BATCHES_PER_EPOCH)
    assert (segment / "config.yaml").is_file() and (run / "config.yaml").is_file()
    first_val = [line for line in (run / "metrics.csv").read_text().splitlines()[1:] if line.split(",")]
    assert first_val, "the first segment's metrics.csv is kept"
    assert_same_as_reference(run, log, reference)


def test_sigterm_saves_mid_epoch_and_exits_cleanly_then_resumes_exactly(ham_root, reference, tmp_path):
    runs = tmp_path / "runs"
    (runs / "resume").mkdir(parents=True)
    (runs / "resume" / "split.csv").write_bytes((reference[0] / "resume" / "split.csv").read_bytes())
    log = tmp_path / "preempted.jsonl"
    preempted = fit(ham_root, runs, log, "--trainer.callbacks+=tests.resume.probes.SignalAt",
                    "--trainer.callbacks.epoch=0", "--trainer.callbacks.batch=1", "--trainer.callbacks.signal_name=SIGTERM")
    assert preempted.returncode == 0, preempted.stderr[-3000:]
    assert "SIGTERM: saved" in preempted.stderr
    (run,) = (runs / "resume" / "stage1").iterdir()
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (0, 2)  # the batch under way when SIGTERM came was finished
    assert not (run / "results.json").exists()

    resumed = fit(ham_root, runs, log, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr
    assert_same_as_reference(run, log, (None, *reference[1:]))


@pytest.fixture(scope="module")
def augmented_reference(ham_root, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs_augmented")
    log = runs / "reference.jsonl"
    done = fit(ham_root, runs, log, "--data.augment=dermoscopy")
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (runs / "resume" / "stage1").iterdir()
    snapshot = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    return runs, run, steps(log), snapshot


def test_augmented_run_with_workers_sigterm_mid_epoch_resumes_to_the_uninterrupted_run(ham_root, augmented_reference, tmp_path):
    runs = tmp_path / "runs"
    (runs / "resume").mkdir(parents=True)
    (runs / "resume" / "split.csv").write_bytes((augmented_reference[0] / "resume" / "split.csv").read_bytes())
    log = tmp_path / "preempted.jsonl"
    augmented = ("--data.augment=dermoscopy", "--data.num_workers=2")
    preempted = fit(ham_root, runs, log, *augmented, "--trainer.callbacks+=tests.resume.probes.SignalAt",
                    "--trainer.callbacks.epoch=1", "--trainer.callbacks.batch=2", "--trainer.callbacks.signal_name=SIGTERM")
    assert preempted.returncode == 0, preempted.stderr[-3000:]
    assert "SIGTERM: saved" in preempted.stderr
    (run,) = (runs / "resume" / "stage1").iterdir()
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (1, BATCHES_PER_EPOCH + 3)

    resumed = fit(ham_root, runs, log, *augmented, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference_steps = augmented_reference[2]
    assert len({s["images_sha256"] for s in reference_steps}) == len(reference_steps)  # every batch its own pixels
    assert_same_as_reference(run, log, (None, *augmented_reference[1:]))
