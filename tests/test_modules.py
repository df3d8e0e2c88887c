"""Stage-1 loss composition and stage-2 freezing, checked on single batches."""

import pytest
import torch
import torch.nn.functional as F

from medmetric.lightning_modules.metric_pretrain import MetricPretrainModule
from tests.conftest import make_stage1_handoff

CLASSES = ["a", "b", "c"]


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(12, 3, 32, 32, generator=g), torch.tensor([0, 1, 2] * 4)


def backbone_grads(module, loss):
    module.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in module.backbone.named_parameters() if p.grad is not None}


def logged_step(module, data):
    module.log_dict = lambda *a, **k: None  # no trainer attached
    return module.training_step(data, 0)


def test_metric_weight_zero_is_plain_cross_entropy():
    torch.manual_seed(0)
    module = MetricPretrainModule(CLASSES, backbone="test_resnet", metric_weight=0.0)
    images, targets = batch()
    loss = logged_step(module, (images, targets))
    assert loss.item() == pytest.approx(F.cross_entropy(module(images), targets).item(), rel=1e-6)


def test_loss_is_ce_plus_lambda_times_metric():
    torch.manual_seed(0)
    module = MetricPretrainModule(CLASSES, backbone="test_resnet", metric_weight=0.5).eval()
    images, targets = batch()
    features = module.backbone(images)
    expected = F.cross_entropy(module.head(features), targets) + 0.5 * module.metric_loss(module.projector(features), targets)
    assert logged_step(module, (images, targets)).item() == pytest.approx(expected.item(), rel=1e-5)


def test_metric_only_keeps_cross_entropy_out_of_the_backbone():
    torch.manual_seed(0)
    module = MetricPretrainModule(CLASSES, backbone="test_resnet", metric_only=True).eval()
    images, targets = batch()
    got = backbone_grads(module, logged_step(module, (images, targets)))
    metric_alone = module.metric_loss(module.projector(module.backbone(images)), targets)
    want = backbone_grads(module, metric_alone)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)
    module.zero_grad()
    logged_step(module, (images, targets)).backward()
    assert module.head.weight.grad.abs().sum() > 0


def test_contradictory_options_are_refused():
    with pytest.raises(ValueError, match="metric_only=true needs model.metric_weight > 0"):
        MetricPretrainModule(CLASSES, backbone="test_resnet", metric_weight=0.0, metric_only=True)
    with pytest.raises(ValueError, match="model.metric_weight must be >= 0"):
        MetricPretrainModule(CLASSES, backbone="test_resnet", metric_weight=-1.0)


def test_crt_loads_the_stage1_backbone_frozen_in_eval_mode(tmp_path):
    from medmetric.lightning_modules.rebalanced_head import RebalancedHeadModule

    handoff = make_stage1_handoff(tmp_path, CLASSES)
    stage1_backbone = torch.load(tmp_path / "backbone.pt", weights_only=True)
    module = RebalancedHeadModule(CLASSES, handoff=str(handoff)).train()
    assert not module.backbone.training and module.strategy.head.training
    assert not any(p.requires_grad for p in module.backbone.parameters())
    for key, value in stage1_backbone.items():
        assert torch.equal(module.backbone.state_dict()[key], value)
    images, targets = batch()
    F.cross_entropy(module(images), targets).backward()
    assert all(p.grad is None for p in module.backbone.parameters())
    assert module.strategy.head.weight.grad.abs().sum() > 0


def test_crt_refuses_another_class_list_or_backbone(tmp_path):
    from medmetric.lightning_modules.rebalanced_head import RebalancedHeadModule
    from medmetric.run_io.manifest import HandoffError

    handoff = make_stage1_handoff(tmp_path, CLASSES)
    with pytest.raises(HandoffError, match="trained on classes"):
        RebalancedHeadModule(["a", "b", "x"], handoff=str(handoff))
    with pytest.raises(HandoffError, match="model.backbone='resnet18'"):
        RebalancedHeadModule(CLASSES, handoff=str(handoff), backbone="resnet18")
    with pytest.raises(ValueError, match=r"unknown stage-2 strategy 'lsw'.*valid: \['crt', 'knn', 'lws', 'ncm', 'tau_norm'\]"):
        RebalancedHeadModule(CLASSES, handoff=str(handoff), strategy="lsw")


def test_shot_group_thresholds_reach_the_metrics():
    """--model.many_shot_threshold/few_shot_threshold decide which classes count as many/medium/few."""
    module = MetricPretrainModule(CLASSES, backbone="test_resnet", many_shot_threshold=50, few_shot_threshold=5)
    module._trainer = type("T", (), {"datamodule": type("D", (), {"class_counts": [60, 30, 3]})()})()
    module.setup("fit")
    logits = torch.eye(3)[[0, 0, 1, 2, 2]] * 5  # predicted: a a b c c
    targets = torch.tensor([0, 1, 1, 2, 0])  # recalls: a 1/2, b 1/2, c 1
    module.test_metrics.update(logits, targets)
    values = module.test_metrics.compute()
    assert values["many_shot_accuracy"] == pytest.approx(0.5)  # a: 60 > 50
    assert values["medium_shot_accuracy"] == pytest.approx(0.5)  # b: 5 <= 30 <= 50
    assert values["few_shot_accuracy"] == pytest.approx(1.0)  # c: 3 < 5
