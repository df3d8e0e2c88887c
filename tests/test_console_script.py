"""The installed ``medmetric`` console script exits 0 after a finished fit, non-zero after a
failed one: shell scripts, SLURM jobs and CI read that code. (It once exited 1 after every
successful fit, because ``main()`` returned the CLI object and the entry point passed it to
``sys.exit``.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

SCRIPT = Path(sys.executable).with_name("medmetric")
TINY = ["--model.backbone=test_resnet", "--data.image_size=32", "--data.batch_size=32", "--data.m_per_class=8",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1", "--wandb=disabled"]


def run_script(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_console_script_is_installed():
    assert SCRIPT.is_file(), f"no console script at {SCRIPT}: is medmetric installed (make setup)?"


def test_a_finished_fit_exits_zero_and_a_failed_one_does_not(ham_root, tmp_path):
    args = ["fit", "--config", "experiments/ham10000/stage1.yaml", f"--data.data_dir={ham_root}",
            f"--runs_dir={tmp_path / 'runs'}", "--experiment=script", *TINY]
    done = run_script(args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((tmp_path / "runs" / "script" / "stage1").glob("*/results.json"))
    assert "MedMetricCLI object" not in done.stdout + done.stderr
    failed = run_script([*args[:4], f"--data.data_dir={tmp_path / 'absent'}", *args[5:]])
    assert failed.returncode != 0
