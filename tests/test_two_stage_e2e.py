"""Stage 1 then stage 2 through the real CLI on generated HAM10000-format data.

Checks what a user relies on: the handoff manifest, a backbone that stage 2 leaves
bit-identical (weights and BatchNorm statistics), results.json, the saved config, and W&B
running offline without an account.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from medmetric.experiments.cli import main
from medmetric.run_io.manifest import PATH_KEYS, HandoffError

pytestmark = pytest.mark.slow

TINY = [
    "--model.backbone=test_resnet",
    "--data.image_size=32",
    "--data.batch_size=32",
    "--data.m_per_class=8",
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=3",
    "--trainer.max_steps=6",
    "--trainer.log_every_n_steps=1",
]


def only_run(stage_dir: Path) -> Path:
    runs = sorted(p for p in stage_dir.iterdir() if p.is_dir())
    assert len(runs) == 1, runs
    return runs[0]


def balanced_accuracy_from_confusion(confusion: list[list[int]]) -> float:
    recalls = [row[i] / sum(row) for i, row in enumerate(confusion) if sum(row) > 0]
    return sum(recalls) / len(recalls)


@pytest.fixture(scope="module")
def two_stage(ham_root, tmp_path_factory):
    """Run stage 1 (CE + SupCon, W&B auto without an API key) and stage 2 (cRT) once."""
    runs = tmp_path_factory.mktemp("runs")
    home = tmp_path_factory.mktemp("home")  # no ~/.netrc with a W&B key
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("WANDB_API_KEY", raising=False)
        mp.delenv("WANDB_MODE", raising=False)
        mp.setenv("HOME", str(home))
        common = [f"--data.data_dir={ham_root}", f"--runs_dir={runs}", "--experiment=e2e"]
        main(["fit", "--config", "experiments/ham10000/stage1.yaml", *common, *TINY, "--model.lr=0.0123"])
        stage1 = only_run(runs / "e2e" / "stage1")
        before = torch.load(stage1 / "backbone.pt", weights_only=True)
        main(["fit", "--config", "experiments/ham10000/stage2.yaml", *common, *TINY[1:], "--wandb=disabled"])
    return runs, stage1, only_run(runs / "e2e" / "stage2"), before


def test_manifest_names_the_best_validation_checkpoint(two_stage):
    runs, stage1, _, _ = two_stage
    manifest = json.loads((runs / "e2e" / "handoff.json").read_text())
    assert manifest == json.loads((stage1 / "handoff.json").read_text()) | {k: manifest[k] for k in PATH_KEYS}
    assert manifest["backbone"] == {"name": "test_resnet", "in_chans": 3, "kwargs": {}}
    assert manifest["class_names"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    split = pd.read_csv(runs / "e2e" / "split.csv")
    train_counts = split[split.split == "train"].label.value_counts()
    assert manifest["class_counts"] == [int(train_counts.get(c, 0)) for c in manifest["class_names"]]
    assert (runs / "e2e" / manifest["split_file"]).resolve() == (runs / "e2e" / "split.csv").resolve()
    val = pd.read_csv(stage1 / "metrics.csv")["val/balanced_accuracy"].dropna()
    assert manifest["selected_on"] == {"monitor": "val/balanced_accuracy", "value": pytest.approx(val.max())}
    checkpoint = (runs / "e2e" / manifest["checkpoint"]).resolve()
    assert checkpoint.parent == (stage1 / "checkpoints").resolve() and checkpoint.name.startswith("best")


def test_stage2_leaves_the_backbone_bit_identical(two_stage):
    _, _, stage2, before = two_stage
    for name in ("last.ckpt", *[p.name for p in (stage2 / "checkpoints").glob("best*.ckpt")]):
        state = torch.load(stage2 / "checkpoints" / name, weights_only=True)["state_dict"]
        after = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        assert after.keys() == before.keys()
        assert any("running_mean" in k for k in after)  # BatchNorm statistics are compared too
        for key, value in before.items():
            assert torch.equal(after[key], value), f"{name}: backbone.{key} changed in stage 2"


def test_stage2_trained_its_head(two_stage):
    _, _, stage2, _ = two_stage
    losses = pd.read_csv(stage2 / "metrics.csv")["train/loss"].dropna()
    assert len(losses) >= 1 and losses.notna().all()


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_results_json_is_consistent_with_its_confusion_matrix(two_stage, stage):
    _, stage1, stage2, _ = two_stage
    results = json.loads(((stage1 if stage == "stage1" else stage2) / "results.json").read_text())
    assert results["stage"] == stage and results["experiment"] == "e2e"
    metrics, confusion = results["metrics"], results["confusion_matrix"]
    split = pd.read_csv(stage1.parent.parent / "split.csv")
    assert sum(map(sum, confusion)) == (split.split == "test").sum()
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_from_confusion(confusion))
    for i, name in enumerate(results["class_names"]):
        assert metrics[f"recall/{name}"] == pytest.approx(confusion[i][i] / sum(confusion[i]))
    assert Path(results["checkpoint"]).name.startswith("best")


def test_resolved_config_is_saved_with_the_flags_applied(two_stage):
    _, stage1, _, _ = two_stage
    import yaml

    config = yaml.safe_load((stage1 / "config.yaml").read_text())
    assert config["model"]["init_args"]["lr"] == 0.0123
    assert config["data"]["init_args"]["split_file"].endswith("e2e/split.csv")
    assert config["trainer"]["default_root_dir"] == str(stage1)


def test_wandb_runs_offline_without_an_api_key(two_stage):
    _, stage1, _, _ = two_stage
    assert list((stage1 / "wandb").glob("offline-run-*")), "expected an offline W&B run in the run folder"


def test_stage2_without_stage1_says_what_to_run_first(ham_root, tmp_path):
    with pytest.raises(HandoffError, match=r"Run stage 1 first: `make train-stage1 DATA=<data> EXPERIMENT=never-trained`"):
        main([
            "fit", "--config", "experiments/ham10000/stage2.yaml", f"--data.data_dir={ham_root}",
            f"--runs_dir={tmp_path}", "--experiment=never-trained", "--wandb=disabled",
        ])


def test_stage2_refuses_a_different_split(two_stage, ham_root, tmp_path):
    runs, _, _, _ = two_stage
    with pytest.raises(HandoffError, match="data split differs"):
        main([
            "fit", "--config", "experiments/ham10000/stage2.yaml", f"--data.data_dir={ham_root}",
            f"--runs_dir={runs}", "--experiment=e2e", "--wandb=disabled", *TINY[1:],
            f"--data.split_file={tmp_path / 'other.csv'}", "--data.split_seed=7",
        ])
