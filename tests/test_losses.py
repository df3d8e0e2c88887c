"""Metric-loss registry: wrapped PML losses checked against naive loops and run through stage 1."""

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses

from medmetric.lightning_modules.losses import (
    METRIC_LOSSES,
    build_metric_loss,
    class_weights_from_counts,
)
from medmetric.lightning_modules.losses.pml import PML_LOSSES
from medmetric.lightning_modules.metric_pretrain import MetricPretrainModule

PAIR_BASED = ["supcon", "triplet", "contrastive", "multi_similarity", "circle", "ntxent"]
C, D = 4, 8


def data(seed, n=20, d=D, classes=C):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def build(name, **kwargs):
    return build_metric_loss(name, num_classes=C, embedding_dim=D, **kwargs)


def naive_supcon(emb, labels, t):
    """Khosla et al. 2020, eq. 2 (L_out), averaged over anchors that have a positive."""
    z = F.normalize(emb.double(), dim=1)
    per_anchor = []
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denom = sum(math.exp(float(z[i] @ z[a]) / t) for a in range(len(z)) if a != i)
        per_anchor.append(-sum(float(z[i] @ z[p]) / t - math.log(denom) for p in positives) / len(positives))
    return sum(per_anchor) / len(per_anchor)


def naive_batch_hard_terms(emb, labels, margin):
    """Hermans et al. 2017: (anchor, hardest-positive/-negative hinge) per anchor."""
    z = F.normalize(emb.double(), dim=1)
    terms = []
    for i in range(len(z)):
        pos = [float((z[i] - z[p]).norm()) for p in range(len(z)) if p != i and labels[p] == labels[i]]
        neg = [float((z[i] - z[n]).norm()) for n in range(len(z)) if labels[n] != labels[i]]
        if pos and neg:
            terms.append((i, max(0.0, max(pos) - min(neg) + margin)))
    return terms


def naive_contrastive(emb, labels, neg_margin):
    """Hadsell et al. 2006 with pos_margin 0: mean non-zero d(p) and mean non-zero [m - d(n)]+."""
    z = F.normalize(emb.double(), dim=1)
    pos, neg = [], []
    for i in range(len(z)):
        for j in range(len(z)):
            if i == j:
                continue
            d = float((z[i] - z[j]).norm())
            (pos if labels[i] == labels[j] else neg).append(d if labels[i] == labels[j] else max(0.0, neg_margin - d))
    mean_nonzero = lambda xs: sum(x for x in xs if x > 0) / max(1, sum(1 for x in xs if x > 0))  # noqa: E731
    return mean_nonzero(pos) + mean_nonzero(neg)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_supcon_matches_naive_formula(seed):
    emb, labels = data(seed, n=24, d=16)
    assert build("supcon", temperature=0.2)(emb, labels).item() == pytest.approx(naive_supcon(emb, labels, 0.2), rel=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_hard_triplet_matches_naive_loop(seed):
    emb, labels = data(seed)
    terms = [t for _, t in naive_batch_hard_terms(emb, labels, 0.3) if t > 0]
    got = build("triplet", margin=0.3, mining="batch_hard")(emb, labels)
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_contrastive_matches_naive_loop(seed):
    emb, labels = data(seed)
    got = build("contrastive", neg_margin=1.0)(emb, labels)
    assert got.item() == pytest.approx(naive_contrastive(emb, labels, 1.0), rel=1e-4)


@pytest.mark.parametrize("name", sorted(PML_LOSSES))
def test_wrapper_equals_calling_pml_directly(name):
    """Same value and gradient as the bare PML object the wrapper holds."""
    emb, labels = data(3)
    torch.manual_seed(0)
    wrapped = build(name)
    mine = emb.clone().requires_grad_()
    ours = wrapped(mine, labels)
    ours.backward()
    bare = emb.clone().requires_grad_()
    tuples = wrapped.miner(bare, labels) if wrapped.miner is not None else None
    theirs = wrapped.loss(bare, labels, tuples)
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    torch.testing.assert_close(mine.grad, bare.grad)


@pytest.mark.parametrize("name", sorted(METRIC_LOSSES))
def test_every_loss_trains_through_the_stage1_module(name):
    """Forward and backward through MetricPretrainModule; loss-owned weights get gradients and are optimised."""
    torch.manual_seed(0)
    module = MetricPretrainModule(["a", "b", "c", "d"], backbone="test_resnet", embedding_dim=D, metric_loss=name)
    module.log_dict = lambda *a, **k: None
    images, labels = torch.randn(16, 3, 32, 32), torch.arange(4).repeat(4)
    loss = module.training_step((images, labels), 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in module.projector.parameters())
    for param in module.metric_loss.parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all()
    module._trainer = type("T", (), {"estimated_stepping_batches": 10})()
    optimised = {id(p) for group in module.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert {id(p) for p in module.parameters()} == optimised


@pytest.mark.parametrize("name", PAIR_BASED)
def test_no_valid_pair_gives_zero_loss_with_gradient(name):
    if name == "contrastive":  # negatives alone still count: make them all farther than the margin
        emb = torch.eye(6, D).requires_grad_()  # pairwise distance sqrt(2) > neg_margin 1
    else:
        emb = torch.randn(6, D, requires_grad=True)
    loss = build(name)(emb, torch.arange(6))  # every label distinct: no positive pair
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("name", sorted(METRIC_LOSSES))
def test_single_class_and_identical_embeddings_never_give_nan(name):
    emb = torch.ones(8, D, requires_grad=True)
    loss = build(name)(emb, torch.zeros(8, dtype=torch.long))
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("name", sorted(METRIC_LOSSES))
def test_half_precision_input_computes_in_float32(name):
    emb, labels = data(0, n=16)
    torch.manual_seed(0)
    loss_fn = build(name)
    full, half = loss_fn(emb, labels), loss_fn(emb.bfloat16(), labels)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=0.05, abs=1e-3)


def test_class_weights_follow_the_published_formulas():
    counts = [100, 10, 1, 0]
    inverse = class_weights_from_counts(counts, "inverse")
    assert inverse[:3].tolist() == pytest.approx([3 * 0.01 / 1.11, 3 * 0.1 / 1.11, 3 * 1 / 1.11]) and inverse[3] == 0
    effective = class_weights_from_counts(counts, "effective_number", beta=0.9)
    raw = [(1 - 0.9) / (1 - 0.9**n) for n in counts[:3]]  # Cui et al. 2019, eq. 3
    assert effective[:3].tolist() == pytest.approx([3 * r / sum(raw) for r in raw])
    assert class_weights_from_counts(counts, "none").tolist() == [1, 1, 1, 0]
    with pytest.raises(ValueError, match=r"model.class_weighting.*valid"):
        class_weights_from_counts(counts, "inverse_sqrt")


@pytest.mark.parametrize("name", [n for n in sorted(PML_LOSSES) if n != "proxy_anchor"])
def test_equal_class_weights_reproduce_the_unweighted_loss(name):
    emb, labels = data(5)
    torch.manual_seed(0)
    plain = build(name)
    torch.manual_seed(0)
    weighted = build(name, class_weighted=True)
    weighted.set_class_weights(torch.ones(C))
    assert weighted(emb, labels).item() == pytest.approx(plain(emb, labels).item(), rel=1e-6)


def test_class_weighted_triplet_matches_a_weighted_naive_loop():
    emb, labels = data(7)
    weights = torch.tensor([0.5, 1.0, 2.0, 4.0])
    loss_fn = build("triplet", margin=0.3, class_weighted=True)
    loss_fn.set_class_weights(weights)
    terms = [(a, t) for a, t in naive_batch_hard_terms(emb, labels, 0.3) if t > 0]
    expected = sum(float(weights[labels[a]]) * t for a, t in terms) / sum(float(weights[labels[a]]) for a, _ in terms)
    assert loss_fn(emb, labels).item() == pytest.approx(expected, rel=1e-4)


def test_class_weighting_is_refused_where_the_loss_reduces_per_class():
    with pytest.raises(ValueError, match=r"ProxyAnchorLoss reduces per class already.*model.class_weighting"):
        build("proxy_anchor", class_weighted=True)


def test_proxy_losses_own_their_weights():
    loss_fn = build("arcface")
    assert isinstance(loss_fn.loss, pml_losses.ArcFaceLoss) and loss_fn.loss.W.shape == (D, C)


def test_unknown_loss_and_bad_arguments_name_the_config_key():
    with pytest.raises(ValueError, match=r"model\.metric_loss.*valid: \[.*'supcon'.*'triplet'"):
        build_metric_loss("arcfacee")
    with pytest.raises(ValueError, match=r"model\.metric_loss_kwargs"):
        build_metric_loss("supcon", temprature=0.1)
    with pytest.raises(ValueError, match=r"mining.*valid"):
        build_metric_loss("triplet", mining="hardest")
