"""Typed components: metric loss, head loss, stage-2 strategy, optimiser and LR schedule are
classes the CLI builds (short names still work), every module documents and scales its LR,
warm-up follows its formula, and a new loss or strategy plugs in from one file.

The toy metric loss and toy strategy below are the "one new file" of a contributor: nothing
else in the code base names them. They are plugged in through the real CLI by class_path
(``--allow_class_paths=tests.test_typed_components``) and by their short names.
"""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import docstring_parser
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from medmetric.lightning_modules.head_strategies import STRATEGIES, HeadStrategy
from medmetric.lightning_modules.losses.base import METRIC_LOSSES, MetricLoss
from medmetric.lightning_modules.optimization import OptimizerMixin
from tests.conftest import make_stage1_handoff

HERE = __name__  # tests.test_typed_components
HAM = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
TINY = [
    "--model.backbone=test_resnet", "--data.image_size=32", "--data.batch_size=32", "--data.m_per_class=8",
    "--wandb=disabled",
]


# --- the contributor's new file: a toy metric loss and a toy stage-2 strategy -----------------------
class ToySpreadLoss(MetricLoss):
    """Mean squared distance of each embedding to its class mean in the batch, times ``scale``.

    Args:
        num_classes: given by the module (unused).
        embedding_dim: given by the module (unused).
        scale: factor of the loss.
    """

    short_name = "toy_spread"
    calls = 0

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        type(self).calls += 1
        means = torch.zeros(int(labels.max()) + 1, embeddings.shape[1]).index_add(0, labels, embeddings)
        counts = torch.bincount(labels).clamp_min(1)[:, None]
        per_sample = (embeddings - (means / counts)[labels]).pow(2).sum(1)
        return self.scale * self.reduce(per_sample, labels, embeddings)


class ToyPriorStrategy(HeadStrategy):
    """Predicts the (smoothed) training class prior for every image: a post-hoc strategy.

    Args:
        feature_dim: given by the module.
        num_classes: given by the module.
        stage1_head: given by the module (unused).
        smoothing: added to every class count.
    """

    short_name = "toy_prior"
    trainable = False

    def __init__(self, feature_dim: int, num_classes: int, stage1_head, smoothing: float = 1.0):
        super().__init__()
        self.smoothing = smoothing
        self.register_buffer("log_prior", torch.zeros(num_classes))

    def fit(self, features: Tensor, targets: Tensor) -> None:
        counts = torch.bincount(targets, minlength=self.log_prior.numel()).double() + self.smoothing
        self.log_prior.copy_((counts / counts.sum()).log().float())

    def forward(self, features: Tensor) -> Tensor:
        return self.log_prior.expand(len(features), -1) + 0 * features.sum(1, keepdim=True)


# The toys registered their short names themselves when their classes were defined (no central
# table names them). pytest imports every test file before running any, so take them out again
# at once: other files' tests of the registries' exact contents must see only the shipped
# components. The fixture puts them back for this module's tests only.
TOYS_SELF_REGISTERED = METRIC_LOSSES["toy_spread"] is ToySpreadLoss and STRATEGIES["toy_prior"] is ToyPriorStrategy
METRIC_LOSSES.remove("toy_spread")
STRATEGIES.remove("toy_prior")


@pytest.fixture(scope="module")
def toys_registered():
    assert TOYS_SELF_REGISTERED
    METRIC_LOSSES.add("toy_spread", ToySpreadLoss)
    STRATEGIES.add("toy_prior", ToyPriorStrategy)
    yield
    METRIC_LOSSES.remove("toy_spread")
    STRATEGIES.remove("toy_prior")


def test_a_subclass_with_a_short_name_registers_itself():
    class ScratchStrategy(HeadStrategy):
        short_name = "scratch_strategy_for_test"

    try:
        assert STRATEGIES["scratch_strategy_for_test"] is ScratchStrategy
        assert "scratch_strategy_for_test" in sorted(STRATEGIES)
    finally:
        STRATEGIES.remove("scratch_strategy_for_test")


def test_a_new_strategy_file_is_found_by_its_short_name(tmp_path, monkeypatch):
    """A file nobody imports is found: the registry imports its plugin modules before a lookup."""
    package = tmp_path / "plugpkg_typed"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "head_strategy_mine.py").write_text(
        "from medmetric.lightning_modules.head_strategies import HeadStrategy\n\n\n"
        "class MineFromScan(HeadStrategy):\n    short_name = 'mine_from_scan'\n"
    )
    (package / "unrelated.py").write_text("raise RuntimeError('only head_strategy_* modules are imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(STRATEGIES, "scan", (("plugpkg_typed", "head_strategy_"),))
    monkeypatch.setattr(STRATEGIES, "_scanned", False)
    try:
        assert STRATEGIES["mine_from_scan"].__name__ == "MineFromScan"
    finally:
        STRATEGIES.remove("mine_from_scan")


def fit(*args: str):
    from medmetric.experiments.cli import main

    return main(["fit", *args])


@pytest.fixture(scope="module")
def stage1_runs(ham_root, tmp_path_factory):
    """One short stage-1 run (experiment ``typed``) whose handoff stage 2 reads."""
    runs = tmp_path_factory.mktemp("runs")
    fit("--config", "experiments/ham10000/stage1.yaml", f"--data.data_dir={ham_root}", f"--runs_dir={runs}",
        "--experiment=typed", *TINY, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1", "--test_after_fit=false")
    return runs


def stage1_fast(ham_root, tmp_path, *flags):
    return fit("--config", "experiments/ham10000/stage1.yaml", f"--data.data_dir={ham_root}", f"--runs_dir={tmp_path}",
               *TINY, "--trainer.fast_dev_run=1", "--test_after_fit=false", *flags)


def stage2(runs, ham_root, *flags):
    return fit("--config", "experiments/ham10000/stage2.yaml", f"--data.data_dir={ham_root}", f"--runs_dir={runs}",
               "--experiment=typed", "--data.image_size=32", "--data.batch_size=32", "--data.augment=none",
               "--wandb=disabled", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
               "--trainer.limit_val_batches=1", "--test_after_fit=false", *flags)


# --- component arguments reach the built objects through the real CLI -----------------------------
@pytest.mark.slow
def test_cli_component_arguments_reach_the_built_objects(ham_root, tmp_path):
    cli = stage1_fast(
        ham_root, tmp_path,
        "--model.metric_loss=SupCon", "--model.metric_loss.temperature=0.05",
        "--model.head_loss=LogitAdjustedLoss", "--model.head_loss.tau=0.5",
        "--model.optimizer=SGD", "--model.optimizer.nesterov=true", "--model.optimizer.momentum=0.8",
        "--model.lr=0.03", "--model.weight_decay=0.002",
    )
    assert cli.model.metric_loss.loss.temperature == 0.05
    assert cli.model.head_loss.tau == 0.5 and type(cli.model.head_loss).__name__ == "LogitAdjustedLoss"
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is torch.optim.SGD
    for group in optimizer.param_groups:  # model.lr / weight_decay win over the class's own defaults
        assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.8, True, 0.002)
    assert optimizer.param_groups[0]["initial_lr"] == 0.03


@pytest.mark.slow
def test_cli_init_args_form_and_short_names_with_kwargs(ham_root, tmp_path):
    cli = stage1_fast(
        ham_root, tmp_path,
        "--model.metric_loss.class_path=medmetric.lightning_modules.losses.pml.Triplet",
        "--model.metric_loss.init_args.margin=0.3", "--model.head_loss=ldam", "--model.head_loss_kwargs={max_margin: 0.4}",
        "--model.optimizer=sgd",
    )
    assert type(cli.model.metric_loss).__name__ == "Triplet" and cli.model.metric_loss.loss.margin == 0.3
    margins = cli.model.head_loss.margins
    counts = torch.as_tensor(cli.datamodule.class_counts, dtype=torch.float64).clamp_min(1)
    expected = counts**-0.25 * (0.4 / (counts**-0.25).max())  # LDAM: C / n^(1/4), largest = max_margin
    assert torch.allclose(margins.double(), expected, atol=1e-6)
    (group, *_) = cli.trainer.optimizers[0].param_groups
    assert group["momentum"] == 0.9  # the short name sgd keeps its momentum


@pytest.mark.slow
def test_cli_strategy_argument_reaches_knn(stage1_runs, ham_root):
    cli = stage2(stage1_runs, ham_root, "--model.strategy=NearestNeighbours", "--model.strategy.k=20",
                 "--model.strategy.temperature=0.3")
    assert (cli.model.strategy.k, cli.model.strategy.temperature) == (20, 0.3)
    assert cli.model.strategy.bank.shape[0] == sum(cli.datamodule.class_counts)  # fitted on every training image


# --- one new file: toy loss and toy strategy end to end ----------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("spelling", ["class_path", "short_name"])
def test_a_new_metric_loss_is_one_file(spelling, ham_root, tmp_path, toys_registered):
    flags = (
        [f"--model.metric_loss.class_path={HERE}.ToySpreadLoss", "--model.metric_loss.init_args.scale=2.5"]
        if spelling == "class_path" else ["--model.metric_loss=toy_spread", "--model.metric_loss_kwargs={scale: 2.5}"]
    )
    ToySpreadLoss.calls = 0
    cli = stage1_fast(ham_root, tmp_path, f"--allow_class_paths={HERE}", *flags)
    loss = cli.model.metric_loss
    assert type(loss) is ToySpreadLoss and loss.scale == 2.5 and ToySpreadLoss.calls >= 1
    # the value it gives is the formula's: 2.5 x mean squared distance to the class mean
    embeddings = F.normalize(torch.randn(6, 4), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    by_hand = 0.0
    for i in range(6):
        mates = embeddings[labels == labels[i]]
        by_hand += float((embeddings[i] - mates.mean(0)).pow(2).sum()) / 6
    assert float(loss(embeddings, labels)) == pytest.approx(2.5 * by_hand, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("spelling", ["class_path", "short_name"])
def test_a_new_head_strategy_is_one_file(spelling, stage1_runs, ham_root, toys_registered):
    flags = (
        [f"--model.strategy.class_path={HERE}.ToyPriorStrategy", "--model.strategy.init_args.smoothing=3"]
        if spelling == "class_path" else ["--model.strategy=toy_prior", "--model.strategy_kwargs={smoothing: 3}"]
    )
    cli = stage2(stage1_runs, ham_root, f"--allow_class_paths={HERE}", *flags)
    strategy = cli.model.strategy
    assert type(strategy) is ToyPriorStrategy and strategy.smoothing == 3
    counts = [c + 3 for c in cli.model.manifest["class_counts"]]  # stage 1's training counts, + smoothing
    assert strategy.log_prior.exp().tolist() == pytest.approx([c / sum(counts) for c in counts], rel=1e-6)


def test_unknown_short_names_name_the_key_and_the_fix(tmp_path):
    from medmetric.lightning_modules.metric_pretrain import MetricPretrainModule
    from medmetric.lightning_modules.rebalanced_head import RebalancedHeadModule

    with pytest.raises(ValueError, match=r"model\.metric_loss.*'supcon'.*--model\.metric_loss=<name>.*class_path"):
        MetricPretrainModule(HAM, backbone="test_resnet", metric_loss="supcom")
    with pytest.raises(ValueError, match=r"model\.head_loss.*'balanced_softmax'.*--model\.head_loss=<name>"):
        MetricPretrainModule(HAM, backbone="test_resnet", head_loss="balanced")
    with pytest.raises(ValueError, match=r"model\.optimizer.*\['adamw', 'sgd'\]"):
        MetricPretrainModule(HAM, backbone="test_resnet", optimizer="adam")
    with pytest.raises(ValueError, match=r"model\.lr_scheduler.*'cosine'"):
        MetricPretrainModule(HAM, backbone="test_resnet", lr_scheduler="onecycle")
    with pytest.raises(ValueError, match=r"--model\.metric_loss\.class_path=medmetric\.x\.Y"):
        MetricPretrainModule(HAM, backbone="test_resnet", metric_loss="medmetric.x.Y")
    handoff = make_stage1_handoff(tmp_path, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"model\.strategy.*'knn'.*--model\.strategy=<name>"):
        RebalancedHeadModule(["a", "b", "c"], handoff=str(handoff), strategy="kNN")


# --- warm-up then cosine -------------------------------------------------------------------------------
class _Schedulable(OptimizerMixin):
    """The optimiser mixin with a stand-in trainer: T optimiser steps, no DataModule."""

    def __init__(self, total: int, **hparams):
        self.hparams = hparams
        self._lr_scheduler = hparams.get("lr_scheduler", "cosine")  # what every module stores
        self.trainer = SimpleNamespace(estimated_stepping_batches=total, datamodule=None)


def lrs(total: int, steps: int, **hparams) -> list[float]:
    weight = torch.nn.Parameter(torch.zeros(1))
    config = _Schedulable(total, **hparams).make_optimizer([weight], "sgd", 0.1, 0.0)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_warmup_then_cosine_follows_the_formula():
    total, warmup, base = 20, 5, 0.1
    got = lrs(total, total, warmup_steps=warmup)
    for step in (0, 1, 4, 5, 6, 12, 19):
        if step < warmup:
            expected = base * (step + 1) / warmup  # linear ramp, reaching base at the last warm-up step
        else:
            expected = base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert got[step] == pytest.approx(expected, rel=1e-12, abs=1e-15), step
    assert got[4] == pytest.approx(base) and got[5] == pytest.approx(base)


def test_no_warmup_is_bit_identical_to_per_step_cosine_annealing():
    total = 17
    weight = torch.nn.Parameter(torch.zeros(1))
    reference_optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(reference_optimizer, T_max=total)
    expected = []
    for _ in range(total):
        expected.append(reference_optimizer.param_groups[0]["lr"])
        reference_optimizer.step()
        reference.step()
    assert lrs(total, total, warmup_steps=0) == expected  # exact, not approx
    assert lrs(total, total) == expected  # modules without the hparam
    for step in (0, 3, 16):  # and that is the textbook cosine
        assert expected[step] == pytest.approx(0.05 * (1 + math.cos(math.pi * step / total)), rel=1e-9)


def test_constant_schedule_with_warmup():
    assert lrs(10, 6, lr_scheduler="constant", warmup_steps=4) == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])


# --- LR scaling for every module class --------------------------------------------------------------------
def every_module(tmp_path):
    """One instance of each LightningModule class (tiny backbones; text encoder from the test helper)."""
    from medmetric.lightning_modules.cross_modal import CrossModalModule
    from medmetric.lightning_modules.metric_pretrain import MetricPretrainModule
    from medmetric.lightning_modules.multilabel_head import MultiLabelHeadModule
    from medmetric.lightning_modules.multilabel_pretrain import MultiLabelPretrainModule
    from medmetric.lightning_modules.rebalanced_head import RebalancedHeadModule
    from tests.test_text_embeddings import CXR14, write_tiny_text_encoder

    scaling = {"lr": 0.01, "lr_scaling": "linear", "base_batch_size": 32}
    handoff = str(make_stage1_handoff(tmp_path, HAM))
    encoder = write_tiny_text_encoder(tmp_path / "tiny-bert")
    yield MetricPretrainModule(HAM, backbone="test_resnet", **scaling)
    yield RebalancedHeadModule(HAM, handoff=handoff, **scaling)
    yield MultiLabelPretrainModule(HAM, backbone="test_resnet", **scaling)
    yield MultiLabelHeadModule(HAM, handoff=handoff, **scaling)
    yield CrossModalModule(CXR14, backbone="test_resnet", text_encoder=str(encoder), text_cache_dir=str(tmp_path / "c"), **scaling)


def test_every_module_scales_its_lr_to_the_global_batch(tmp_path):
    names = []
    for module in every_module(tmp_path):
        # global batch = 16 per device x 2 devices x 3 accumulated = 96; linear rule: 0.01 x 96 / 32
        module._trainer = SimpleNamespace(
            datamodule=SimpleNamespace(batch_size=16), world_size=2, accumulate_grad_batches=3, estimated_stepping_batches=10
        )
        optimizer = module.configure_optimizers()["optimizer"]
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.03), type(module).__name__
        names.append(type(module).__name__)
    assert len(set(names)) == 5


# --- every module documents every argument --------------------------------------------------------------------
def module_classes():
    from medmetric.lightning_modules.cross_modal import CrossModalModule
    from medmetric.lightning_modules.metric_pretrain import MetricPretrainModule
    from medmetric.lightning_modules.multilabel_head import MultiLabelHeadModule
    from medmetric.lightning_modules.multilabel_pretrain import MultiLabelPretrainModule
    from medmetric.lightning_modules.rebalanced_head import RebalancedHeadModule

    return [MetricPretrainModule, RebalancedHeadModule, MultiLabelPretrainModule, MultiLabelHeadModule, CrossModalModule]


@pytest.mark.parametrize("cls", module_classes(), ids=lambda c: c.__name__)
def test_every_init_argument_has_a_docstring_entry(cls):
    documented = {p.arg_name: (p.description or "").strip() for p in docstring_parser.parse(cls.__doc__ or "").params}
    arguments = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    missing = [n for n in arguments if not documented.get(n)]
    assert not missing, f"{cls.__name__} docstring Args: lacks {missing}"
    stale = [n for n in documented if n not in arguments]
    assert not stale, f"{cls.__name__} documents arguments it does not take: {stale}"
    for name in ("warmup_steps", "lr_scaling", "base_batch_size", "optimizer", "lr_scheduler"):
        assert name in arguments, f"{cls.__name__} lacks {name}"


def test_help_shows_the_argument_descriptions(capsys):
    from medmetric.experiments.cli import main

    with pytest.raises(SystemExit):
        main(["fit", "--model.help=medmetric.lightning_modules.metric_pretrain.MetricPretrainModule"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name, words in (("warmup_steps", "linear warm-up steps before the cosine"), ("metric_loss", "the metric loss: a short name"),
                        ("lr_scaling", "scale ``lr`` with the global batch")):
        assert f"--model.{name} " in text and words in text, name
    # the component is typed (not a bare string): its type and the classes it accepts are listed
    assert "type: str | Callable[[int, int], MetricLossBase]" in text
    assert "medmetric.lightning_modules.losses.pml.SupCon" in text and "medmetric.lightning_modules.losses.center.CenterLoss" in text
