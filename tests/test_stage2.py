"""Stage-2 strategies against their formulas and naive loops; tau never tuned on test; cache parity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medmetric.lightning_modules.head_strategies import (
    LearnableWeightScaling,
    NearestClassMean,
    NearestNeighbours,
    TauNormalisedClassifier,
    balanced_accuracy,
)
from medmetric.lightning_modules.heads import LinearHead, Projector
from medmetric.lightning_modules.rebalanced_head import RebalancedHeadModule
from tests.conftest import make_stage1_handoff

CLASSES = ["a", "b", "c"]


def stage1_head(seed=0, features=6, classes=3):
    torch.manual_seed(seed)
    return LinearHead(features, classes)


def test_lws_starts_as_the_stage1_head_and_trains_only_its_scales():
    head = stage1_head()
    lws = LearnableWeightScaling(6, 3, head)
    x = torch.randn(5, 6)
    torch.testing.assert_close(lws(x), head(x))
    assert [n for n, p in lws.named_parameters() if p.requires_grad] == ["scales"]
    with torch.no_grad():
        lws.scales.copy_(torch.tensor([2.0, 1.0, 0.5]))
    torch.testing.assert_close(lws(x), head(x) * torch.tensor([2.0, 1.0, 0.5]))


def test_tau_norm_matches_the_formula_by_hand():
    head = stage1_head()
    tau_norm = TauNormalisedClassifier(6, 3, head)
    x = torch.randn(4, 6)
    for tau in (0.0, 0.5, 1.0, 1.7):
        expected = torch.tensor([[sum(float(x[i, k]) * float(head.weight[j, k]) for k in range(6)) / float(head.weight[j].norm()) ** tau for j in range(3)] for i in range(4)])
        torch.testing.assert_close(tau_norm.logits_for(x, tau), expected, rtol=1e-5, atol=1e-5)


def test_tau_is_the_grid_value_with_the_best_validation_balanced_accuracy():
    head = stage1_head(1)
    tau_norm = TauNormalisedClassifier(6, 3, head, tau_grid=[0.0, 0.5, 1.0, 1.5, 2.0])
    x, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    chosen = tau_norm.select_on_validation(x, y)

    def naive_balanced_accuracy(tau):
        pred = tau_norm.logits_for(x, tau).argmax(1).tolist()
        recalls = [sum(p == c for p, t in zip(pred, y.tolist(), strict=True) if t == c) / max(1, (y == c).sum().item()) for c in range(3) if (y == c).any()]
        return sum(recalls) / len(recalls)

    best = max(naive_balanced_accuracy(t) for t in [0.0, 0.5, 1.0, 1.5, 2.0])
    assert chosen["tau_val_balanced_accuracy"] == pytest.approx(best)
    assert naive_balanced_accuracy(chosen["tau"]) == pytest.approx(best) and float(tau_norm.tau) == chosen["tau"]


def test_ncm_predicts_the_nearest_normalised_class_mean():
    x, y = torch.randn(40, 6), torch.arange(40) % 3
    ncm = NearestClassMean(6, 3, stage1_head())
    ncm.fit(x, y)
    query = torch.randn(10, 6)
    for i in range(10):
        q = F.normalize(query[i], dim=0)
        sims = []
        for c in range(3):
            members = [F.normalize(x[j], dim=0) for j in range(40) if y[j] == c]
            mean = F.normalize(sum(members) / len(members), dim=0)
            sims.append(float(q @ mean))
        assert ncm(query[i : i + 1]).argmax().item() == max(range(3), key=lambda c: sims[c])
        torch.testing.assert_close(ncm(query[i : i + 1])[0], torch.tensor(sims), rtol=1e-5, atol=1e-5)


def test_knn_votes_like_a_naive_loop_and_survives_a_checkpoint():
    torch.manual_seed(0)
    projector = Projector(6, 4)
    knn = NearestNeighbours(6, 3, stage1_head(), projector, k=5, temperature=0.5, chunk_size=3)
    x, y = torch.randn(30, 6), torch.arange(30) % 3
    knn.fit(x, y)
    query = torch.randn(7, 6)
    bank, q = projector(x).detach(), projector(query).detach()
    for i in range(7):
        sims = sorted(((float(q[i] @ bank[j]), int(y[j])) for j in range(30)), reverse=True)[:5]
        votes = [sum(math.exp(s / 0.5) for s, label in sims if label == c) for c in range(3)]
        expected = [math.log(v / sum(votes) + 1e-8) for v in votes]
        torch.testing.assert_close(knn(query[i : i + 1])[0], torch.tensor(expected), rtol=1e-4, atol=1e-4)
    restored = NearestNeighbours(6, 3, stage1_head(), Projector(6, 4), k=5, temperature=0.5)
    restored.load_state_dict(knn.state_dict())
    torch.testing.assert_close(restored(query), knn(query))


def test_balanced_accuracy_helper_matches_sklearn():
    from sklearn.metrics import balanced_accuracy_score

    logits, y = torch.randn(50, 4), torch.randint(0, 3, (50,))  # class 3 absent from targets
    assert balanced_accuracy(logits, y, 4) == pytest.approx(balanced_accuracy_score(y, logits.argmax(1)))


# --- through the module --------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["crt", "lws", "tau_norm", "ncm", "knn"])
def test_every_strategy_builds_and_accepts_images_or_features(tmp_path, strategy):
    module = RebalancedHeadModule(CLASSES, handoff=str(make_stage1_handoff(tmp_path, CLASSES)), strategy=strategy)
    images = torch.randn(6, 3, 32, 32)
    if not module.strategy.trainable and strategy != "tau_norm":
        module.strategy.fit(module.features(torch.randn(9, 3, 32, 32)), torch.arange(9) % 3)
    from_images = module(images)
    torch.testing.assert_close(module(module.features(images)), from_images)
    assert from_images.shape == (6, 3)


def test_posthoc_logit_adjustment_subtracts_tau_log_prior(tmp_path):
    handoff = str(make_stage1_handoff(tmp_path, CLASSES, counts=(30, 10, 2)))
    plain = RebalancedHeadModule(CLASSES, handoff=handoff, strategy="lws")
    adjusted = RebalancedHeadModule(CLASSES, handoff=handoff, strategy="lws", posthoc_tau=0.7)
    features = torch.randn(4, plain.feature_dim)
    prior = torch.tensor([30.0, 10.0, 2.0]) / 42
    torch.testing.assert_close(adjusted(features), plain(features) - 0.7 * prior.log())


def test_unknown_strategy_and_bad_strategy_arguments_name_the_key(tmp_path):
    handoff = str(make_stage1_handoff(tmp_path, CLASSES))
    with pytest.raises(ValueError, match=r"model.strategy.*valid: \['crt', 'knn', 'lws', 'ncm', 'tau_norm'\]"):
        RebalancedHeadModule(CLASSES, handoff=handoff, strategy="decoupled")
    with pytest.raises(ValueError, match=r"model.strategy_kwargs"):
        RebalancedHeadModule(CLASSES, handoff=handoff, strategy="knn", strategy_kwargs={"neighbours": 3})
    with pytest.raises(ValueError, match=r"bn_reestimate.*feature_cache"):
        RebalancedHeadModule(CLASSES, handoff=handoff, bn_reestimate=True, feature_cache=True)


# --- end to end through the CLI ------------------------------------------------------------------
@pytest.fixture(scope="module")
def stage1_run(ham_root, tmp_path_factory):
    from medmetric.experiments.cli import main

    runs = tmp_path_factory.mktemp("runs")
    main([
        "fit", "--config", "experiments/ham10000/stage1.yaml", f"--data.data_dir={ham_root}", f"--runs_dir={runs}",
        "--experiment=s2", "--model.backbone=test_resnet", "--data.image_size=32", "--data.batch_size=32",
        "--data.m_per_class=8", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--wandb=disabled",
    ])
    return runs


def stage2(runs, ham_root, *flags):
    from medmetric.experiments.cli import main

    cli = main([
        "fit", "--config", "experiments/ham10000/stage2.yaml", f"--data.data_dir={ham_root}", f"--runs_dir={runs}",
        "--experiment=s2", "--data.image_size=32", "--data.batch_size=32", "--wandb=disabled", "--data.augment=none",
        "--trainer.max_epochs=2", *flags,
    ])
    return cli


@pytest.mark.slow
def test_tau_search_sees_validation_images_only(stage1_run, ham_root, monkeypatch):
    seen = []
    original = TauNormalisedClassifier.select_on_validation

    def spy(self, features, targets):
        seen.append(features.detach().clone())
        return original(self, features, targets)

    monkeypatch.setattr(TauNormalisedClassifier, "select_on_validation", spy)
    cli = stage2(stage1_run, ham_root, "--model.strategy=tau_norm")
    datamodule = cli.datamodule
    val_features = torch.cat([cli.model.features(x) for x, _ in datamodule.ordered_dataloader("val", sharded=False)])
    test_features = torch.cat([cli.model.features(x) for x, _ in datamodule.ordered_dataloader("test", sharded=False)])
    assert seen, "tau was never selected"
    for features in seen:
        torch.testing.assert_close(features, val_features)
        assert features.shape != test_features.shape or not torch.allclose(features, test_features)
    results = json.loads((Path(cli.trainer.default_root_dir) / "results.json").read_text())
    assert 0 <= results["metrics"]["balanced_accuracy"] <= 1


@pytest.mark.slow
def test_cached_and_uncached_heads_agree(stage1_run, ham_root):
    uncached = stage2(stage1_run, ham_root, "--model.strategy=crt", "--seed_everything=3")
    cached = stage2(stage1_run, ham_root, "--model.strategy=crt", "--seed_everything=3", "--model.feature_cache=true")
    reused = stage2(stage1_run, ham_root, "--model.strategy=crt", "--seed_everything=3", "--model.feature_cache=true")
    caches = list((stage1_run / "s2" / "feature_cache").glob("*.pt"))
    assert len(caches) == 1, "the second cached run must reuse the first run's features"
    for other in (cached, reused):
        for name, value in uncached.model.strategy.state_dict().items():
            torch.testing.assert_close(other.model.strategy.state_dict()[name], value, rtol=1e-4, atol=1e-5)
    results = [json.loads((Path(c.trainer.default_root_dir) / "results.json").read_text())["metrics"] for c in (uncached, cached)]
    assert results[0]["balanced_accuracy"] == pytest.approx(results[1]["balanced_accuracy"])


@pytest.mark.slow
def test_feature_cache_refuses_augmentation(stage1_run, ham_root):
    with pytest.raises(ValueError, match=r"feature_cache=true needs data.augment=none"):
        stage2(stage1_run, ham_root, "--model.feature_cache=true", "--data.augment=dermoscopy")


def test_shift_bn_reestimates_statistics_as_the_mean_over_stage2_batches(tmp_path):
    """MiSLAS shift-BN: after one pass, each BatchNorm's running mean is the average of its
    per-batch input means (cumulative average), computed here independently with hooks."""
    module = RebalancedHeadModule(CLASSES, handoff=str(make_stage1_handoff(tmp_path, CLASSES)), bn_reestimate=True)
    batches = [(torch.randn(8, 3, 32, 32) * 2 + 1, torch.zeros(8, dtype=torch.long)) for _ in range(3)]
    first_bn = next(m for m in module.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    handle = first_bn.register_forward_hook(lambda mod, inputs, out: seen.append(inputs[0].detach().mean((0, 2, 3))))
    fake_trainer = type("T", (), {"datamodule": type("D", (), {"train_dataloader": lambda self: batches})()})()
    module._trainer = fake_trainer
    module._reestimate_batchnorm()
    handle.remove()
    torch.testing.assert_close(first_bn.running_mean, torch.stack(seen).mean(0), rtol=1e-4, atol=1e-5)
    assert not first_bn.training


def test_one_stage_baseline_uses_the_chosen_head_loss():
    """Stage 1 with metric_weight=0 and head_loss=balanced_softmax is that one-stage baseline."""
    from medmetric.lightning_modules.losses.rebalancing import BalancedSoftmaxLoss
    from medmetric.lightning_modules.metric_pretrain import MetricPretrainModule

    torch.manual_seed(0)
    module = MetricPretrainModule(CLASSES, backbone="test_resnet", metric_weight=0.0, head_loss="balanced_softmax")
    counts = [40, 8, 2]
    module._trainer = type("T", (), {"datamodule": type("D", (), {"class_counts": counts})()})()
    module.setup("fit")
    module.log_dict = lambda *a, **k: None
    module.eval()
    images, targets = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    expected = BalancedSoftmaxLoss(counts)(module(images), targets)
    assert module.training_step((images, targets), 0).item() == pytest.approx(expected.item(), rel=1e-6)
    expected_by_hand = F.cross_entropy(module(images) + torch.tensor(counts, dtype=torch.float).log(), targets)
    assert expected.item() == pytest.approx(expected_by_hand.item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"model.head_loss.*valid"):
        MetricPretrainModule(CLASSES, backbone="test_resnet", head_loss="balanced_softmx")
