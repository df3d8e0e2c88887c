"""Declared contracts between the CLI, models, DataModules and callbacks.

A DataModule or model that lacks a member a reader needs is refused with the class, the member
and the fix; it no longer switches a guard off (stage 2's split check, results.json's
fingerprint). A model's stage and checkpoint monitor are declared on its class, so a module
the CLI has never heard of runs through it (the toy modules below).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medmetric.callbacks.handoff import StageHandoff
from medmetric.callbacks.results import ResultsWriter
from medmetric.datamodules.contracts import ContractError
from medmetric.experiments.cli import MedMetricCLI
from medmetric.lightning_modules.classifier_base import ClassifierModule
from medmetric.lightning_modules.metric_pretrain import MetricPretrainModule
from medmetric.lightning_modules.rebalanced_head import RebalancedHeadModule
from tests.conftest import make_stage1_handoff

CLASSES = ["a", "b", "c"]
FIX = "subclass medmetric.datamodules.base.ImageClassificationDataModule"


class StageTwoDataWithoutSplitHash:
    """Everything stage 2 reads except ``split_sha256`` (a hand-written DataModule)."""

    class_names = CLASSES
    class_counts = [10, 10, 10]
    split_file = None
    data_dir = Path(".")

    def fingerprint(self) -> str:
        return "f" * 64

    def ordered_dataloader(self, split: str, sharded: bool = True):
        raise AssertionError("not reached in setup")


class StageTwoData(StageTwoDataWithoutSplitHash):
    def split_sha256(self) -> str:
        return "x"  # the split hash make_stage1_handoff writes


def attach(module, datamodule) -> None:
    module._trainer = SimpleNamespace(datamodule=datamodule)


def test_stage2_refuses_a_datamodule_without_split_sha256(tmp_path):
    module = RebalancedHeadModule(CLASSES, handoff=str(make_stage1_handoff(tmp_path, CLASSES)), backbone="test_resnet")
    attach(module, StageTwoDataWithoutSplitHash())
    with pytest.raises(ContractError, match=rf"tests\.test_contracts\.StageTwoDataWithoutSplitHash lacks split_sha256, "
                                            rf"which stage 2 .* needs; {FIX} or implement split_sha256"):
        module.setup("fit")
    attach(module, StageTwoData())  # the same DataModule with the member: the manifest checks run and pass
    module.setup("fit")


def test_stage2_still_refuses_a_split_that_differs_from_stage1(tmp_path):
    """The check the missing member used to skip is the manifest's split comparison."""
    module = RebalancedHeadModule(CLASSES, handoff=str(make_stage1_handoff(tmp_path, CLASSES)), backbone="test_resnet")

    class OtherSplit(StageTwoData):
        def split_sha256(self) -> str:
            return "y"

    attach(module, OtherSplit())
    with pytest.raises(Exception, match="split"):
        module.setup("fit")


class WriterDataWithoutFingerprint:
    class_counts = [3, 2]
    split_file = None
    data_dir = Path(".")
    skipped_images = 0

    def split_sha256(self) -> str:
        return "s"


def _tested_module():
    return SimpleNamespace(class_names=["a", "b"], test_results={"balanced_accuracy": 0.5}, test_confusion=[[1, 0], [0, 1]],
                           test_outputs=None, results_extra={})


def test_results_writer_refuses_a_datamodule_without_fingerprint(tmp_path):
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), ckpt_path=None, datamodule=WriterDataWithoutFingerprint())
    with pytest.raises(ContractError, match=rf"WriterDataWithoutFingerprint lacks fingerprint, which the results writer .* {FIX}"):
        ResultsWriter(experiment="x", stage="stage1").on_test_end(trainer, _tested_module())
    assert not (tmp_path / "results.json").exists()  # no results.json with dataset_fingerprint: null

    class WithFingerprint(WriterDataWithoutFingerprint):
        def fingerprint(self) -> str:
            return "f" * 64

    trainer.datamodule = WithFingerprint()
    ResultsWriter(experiment="x", stage="stage1").on_test_end(trainer, _tested_module())
    assert json.loads((tmp_path / "results.json").read_text())["dataset_fingerprint"] == "f" * 64


class HandoffDataWithoutFingerprint:
    class_counts = [10, 10, 10]
    split_file = None
    data_dir = Path(".")

    def split_sha256(self) -> str:
        return "x"


def test_handoff_refuses_a_datamodule_without_fingerprint(tmp_path):
    stage1 = MetricPretrainModule(CLASSES, backbone="test_resnet", embedding_dim=8)
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), checkpoint_callback=None, datamodule=HandoffDataWithoutFingerprint())
    with pytest.raises(ContractError, match=rf"HandoffDataWithoutFingerprint lacks fingerprint, which the stage-1 handoff .* {FIX}"):
        StageHandoff(experiment_manifest=str(tmp_path / "latest.json"))._publish(trainer, stage1)
    assert not list(tmp_path.iterdir())  # neither a manifest without a fingerprint nor orphan weights
    trainer.datamodule = StageTwoData()  # with fingerprint(): the manifest records it
    StageHandoff(experiment_manifest=None)._publish(trainer, stage1)
    assert json.loads((tmp_path / "handoff.json").read_text())["dataset_fingerprint"] == "f" * 64


def test_shot_groups_refuse_a_datamodule_without_class_counts():
    module = MetricPretrainModule(CLASSES, backbone="test_resnet", embedding_dim=8)
    attach(module, SimpleNamespace(class_names=CLASSES))
    with pytest.raises(ContractError, match=rf"lacks class_counts, which MetricPretrainModule \(shot-group accuracies\) needs; {FIX}"):
        module.setup("fit")


# ---------------------------------------------------------------------------- declared stage


class ToyStage1Module(ClassifierModule):
    """A module the CLI has no entry for: it declares its stage and is run as stage 1."""

    stage: ClassVar[str] = "stage1"

    def __init__(self, class_names, in_chans: int = 3, image_size: int = 16):
        super().__init__(class_names)
        self.save_hyperparameters()
        self.feature_dim = 4
        self.backbone = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(1), nn.Linear(in_chans * 4, self.feature_dim))
        self.head = nn.Linear(self.feature_dim, len(class_names))

    def backbone_config(self) -> dict:
        return {"name": "toy", "in_chans": self.hparams.in_chans, "kwargs": {}}

    def forward(self, images):
        return self.head(self.backbone(images))

    def training_step(self, batch, batch_idx):
        images, targets = batch
        return F.cross_entropy(self(images), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class ToyUndeclaredModule(ToyStage1Module):
    stage = None  # as a LightningModule that never declared one


def _toy_args(ham_root, tmp_path, model: str) -> list[str]:
    return [
        "fit", f"--model=tests.test_contracts.{model}", "--data=medmetric.datamodules.skin.HAM10000DataModule",
        f"--data.data_dir={ham_root}", "--data.image_size=16", "--data.batch_size=8", "--data.num_workers=0",
        "--data.preload=false", "--data.sampler=instance", "--allow_class_paths=tests", f"--runs_dir={tmp_path}",
        "--experiment=toy", "--wandb=disabled", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
    ]


@pytest.mark.slow
def test_a_new_module_runs_through_the_cli_with_its_declared_stage(ham_root, tmp_path):
    cli = MedMetricCLI(args=_toy_args(ham_root, tmp_path, "ToyStage1Module"))
    run_dir = Path(cli.trainer.default_root_dir)
    assert run_dir.parent == tmp_path / "toy" / "stage1"  # the declared stage chose the folder...
    manifest = json.loads((tmp_path / "toy" / "handoff.json").read_text())  # ...and added the handoff
    assert manifest["backbone"]["name"] == "toy" and manifest["class_names"] == cli.datamodule.class_names
    assert cli.trainer.checkpoint_callback.monitor == "val/balanced_accuracy"  # ClassifierModule.monitor
    assert json.loads((run_dir / "results.json").read_text())["stage"] == "stage1"


def test_a_module_without_a_declared_stage_is_refused_before_any_folder(ham_root, tmp_path):
    with pytest.raises(ContractError, match=r"model.class_path tests\.test_contracts\.ToyUndeclaredModule .* does not declare "
                                            r"`stage`; add the class attribute `stage: ClassVar\[str\] = 'stage1'`"):
        MedMetricCLI(args=_toy_args(ham_root, tmp_path, "ToyUndeclaredModule"))
    assert not (tmp_path / "toy").exists()


@pytest.mark.parametrize(("class_path", "stage", "monitor"), [
    # the table experiments/cli.py kept as STAGE_OF_MODEL before stages were declared on the classes
    ("medmetric.lightning_modules.metric_pretrain.MetricPretrainModule", "stage1", "val/balanced_accuracy"),
    ("medmetric.lightning_modules.rebalanced_head.RebalancedHeadModule", "stage2", "val/balanced_accuracy"),
    ("medmetric.lightning_modules.multilabel_pretrain.MultiLabelPretrainModule", "stage1", "val/mean_auroc"),
    ("medmetric.lightning_modules.multilabel_head.MultiLabelHeadModule", "stage2", "val/mean_auroc"),
    ("medmetric.lightning_modules.cross_modal.CrossModalModule", "stage1", "val/mean_auroc"),
])
def test_shipped_modules_declare_the_stage_and_monitor_they_had(class_path, stage, monitor):
    from medmetric.experiments.cli import resolve_class
    from medmetric.lightning_modules.contracts import declared_monitor, declared_stage

    model_class = resolve_class(class_path)
    assert (declared_stage(model_class), declared_monitor(model_class)) == (stage, monitor)


def test_multilabel_modules_refuse_a_datamodule_without_num_train_images():
    from medmetric.lightning_modules.multilabel_pretrain import MultiLabelPretrainModule

    module = MultiLabelPretrainModule(["x", "y"], backbone="test_resnet")
    attach(module, SimpleNamespace(class_counts=[3, 4], unseen_labels=[]))
    with pytest.raises(ContractError, match=r"lacks num_train_images, which MultiLabelPretrainModule .* needs; "
                                            r"use a multi-label DataModule"):
        module.setup("fit")
    attach(module, SimpleNamespace(class_counts=[3, 4], num_train_images=10))  # GZSL mode must be declared
    with pytest.raises(ContractError, match=r"lacks unseen_labels"):
        module.setup("fit")
    attach(module, SimpleNamespace(class_counts=[3, 4], num_train_images=10, unseen_labels=[]))
    module.setup("fit")
    assert module.loss is not None
