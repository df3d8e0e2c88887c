"""Trainer presets, global batch size -> per-device batch, learning-rate scaling, speed options."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from medmetric.datamodules.global_batch import per_device_batch_size
from medmetric.experiments.cli import MedMetricCLI
from medmetric.lightning_modules.lr_scaling import scaled_lr
from tests.conftest import REPO

PRESETS = REPO / "experiments" / "trainer"


def printed_config(*args: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        MedMetricCLI(args=["fit", "--config", "experiments/ham10000/stage1.yaml", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("preset", ["cpu", "gpu", "ddp", "ddp_cpu"])
def test_every_preset_parses_through_the_cli_on_top_of_a_stage_config(preset):
    wanted = yaml.safe_load((PRESETS / f"{preset}.yaml").read_text())["trainer"]
    config = printed_config("--config", str(PRESETS / f"{preset}.yaml"))
    for key, value in wanted.items():
        if key == "callbacks":
            assert [c["class_path"] for c in config["trainer"]["callbacks"]] == [c["class_path"] for c in value]
        else:
            assert config["trainer"][key] == value, key
    assert config["model"]["class_path"].endswith("MetricPretrainModule")  # the stage config is kept
    assert config["data"]["init_args"]["sampler"] == "m_per_class"


def test_slurm_example_launches_the_cli_with_the_ddp_preset():
    script = (PRESETS / "slurm.sbatch").read_text()
    assert "srun" in script and "experiments/trainer/ddp.yaml" in script and "--ckpt_path last" in script
    assert "#SBATCH --signal=TERM@" in script and "#SBATCH --requeue" in script


def test_per_device_batch_divides_the_global_batch_or_says_how_to_fix_it():
    assert per_device_batch_size(512, 8) == 64
    assert per_device_batch_size(512, 4, accumulate_grad_batches=2) == 64
    with pytest.raises(ValueError, match=r"data.global_batch_size=100 .* 3 x 1 = 3; use a multiple of 3 such as 99 or 102"):
        per_device_batch_size(100, 3)


def test_datamodule_derives_its_batch_from_the_global_batch_and_the_world(ham_root):
    from medmetric.datamodules.skin import HAM10000DataModule

    data = HAM10000DataModule(str(ham_root), image_size=32, batch_size=999, global_batch_size=64, num_workers=0)
    data.trainer = SimpleNamespace(world_size=4, accumulate_grad_batches=2, global_rank=0)
    data.setup("fit")
    assert data.batch_size == 8
    assert len(next(iter(data.train_dataloader()))[1]) == 8


def test_lr_scaling_rules_match_their_formulas():
    assert scaled_lr(0.1, "linear", 1024, 256) == pytest.approx(0.4)  # Goyal et al. 2017
    assert scaled_lr(0.1, "sqrt", 1024, 256) == pytest.approx(0.1 * math.sqrt(4))
    assert scaled_lr(0.1, "none", 1024, 256) == 0.1
    with pytest.raises(ValueError, match="model.lr_scaling"):
        scaled_lr(0.1, "cubic", 1024, 256)


@pytest.mark.slow
def test_cpu_fit_scales_the_lr_to_the_global_batch_and_converts_to_channels_last(ham_root, tmp_path):
    cli = MedMetricCLI(args=[
        "fit", "--config", "experiments/ham10000/stage1.yaml", "--config", str(PRESETS / "cpu.yaml"),
        f"--data.data_dir={ham_root}", f"--runs_dir={tmp_path}", "--wandb=disabled", "--test_after_fit=false",
        "--model.backbone=test_resnet", "--data.image_size=32", "--data.m_per_class=4", "--data.preload=false",
        "--data.global_batch_size=16", "--model.lr=0.01", "--model.base_batch_size=8", "--model.lr_scaling=linear",
        "--model.loss_lr_multiplier=1.0", "--trainer.fast_dev_run=1", "--trainer.callbacks+=medmetric.callbacks.speed.SpeedOptions",
    ])
    assert cli.datamodule.batch_size == 16
    (group,) = cli.trainer.optimizers[0].param_groups
    assert group["initial_lr"] == pytest.approx(0.01 * 16 / 8)
    weight = next(p for p in cli.model.backbone.parameters() if p.dim() == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert Path(cli.trainer.default_root_dir).is_dir()


def test_chest_xray_and_medmnist_derive_their_batch_from_the_global_batch(chestxray14_root, tmp_path):
    """The multi-label and in-memory sources take --data.global_batch_size like the base class."""
    import numpy as np

    from medmetric.datamodules.chest_xray import ChestXray14DataModule
    from medmetric.datamodules.medmnist import MedMNISTDataModule

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 40), ("val", 12), ("test", 12)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.arange(n).reshape(-1, 1) % 2
    np.savez(tmp_path / "pneumoniamnist.npz", **arrays)
    world = SimpleNamespace(world_size=2, accumulate_grad_batches=2, global_rank=0)
    for data in (
        ChestXray14DataModule(str(chestxray14_root), image_size=32, batch_size=999, global_batch_size=16, num_workers=0),
        MedMNISTDataModule(str(tmp_path), image_size=28, batch_size=999, global_batch_size=16, num_workers=0),
    ):
        data.trainer = world
        data.setup("fit")
        assert data.batch_size == 16 // (2 * 2)
        assert len(next(iter(data.train_dataloader()))[1]) == 4
