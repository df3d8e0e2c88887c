"""Metric-loss wiring checked against naive loop re-implementations of the published formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.losses import METRIC_LOSSES, build_metric_loss


def naive_supcon(emb: torch.Tensor, labels: torch.Tensor, t: float) -> float:
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


def naive_batch_hard_triplet(emb: torch.Tensor, labels: torch.Tensor, margin: float) -> float:
    """Hermans et al. 2017: hardest positive and negative per anchor; mean over non-zero terms."""
    z = F.normalize(emb.double(), dim=1)
    terms = []
    for i in range(len(z)):
        pos = [float((z[i] - z[p]).norm()) for p in range(len(z)) if p != i and labels[p] == labels[i]]
        neg = [float((z[i] - z[n]).norm()) for n in range(len(z)) if labels[n] != labels[i]]
        if pos and neg:
            terms.append(max(0.0, max(pos) - min(neg) + margin))
    nonzero = [t for t in terms if t > 0]
    return sum(nonzero) / len(nonzero) if nonzero else 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_supcon_matches_naive_formula(seed):
    g = torch.Generator().manual_seed(seed)
    emb, labels = torch.randn(24, 16, generator=g), torch.randint(0, 4, (24,), generator=g)
    got = build_metric_loss("supcon", temperature=0.2)(emb, labels)
    assert got.item() == pytest.approx(naive_supcon(emb, labels, 0.2), rel=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_hard_triplet_matches_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    emb, labels = torch.randn(20, 8, generator=g), torch.randint(0, 3, (20,), generator=g)
    got = build_metric_loss("triplet", margin=0.3, mining="batch_hard")(emb, labels)
    assert got.item() == pytest.approx(naive_batch_hard_triplet(emb, labels, 0.3), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", sorted(METRIC_LOSSES))
def test_no_positive_pair_gives_zero_loss_with_gradient(name):
    emb = torch.randn(6, 8, requires_grad=True)
    loss = build_metric_loss(name)(emb, torch.arange(6))  # every label distinct: no positive pair
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("name", sorted(METRIC_LOSSES))
def test_half_precision_input_computes_in_float32(name):
    g = torch.Generator().manual_seed(0)
    emb, labels = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    loss_fn = build_metric_loss(name)
    full, half = loss_fn(emb, labels), loss_fn(emb.bfloat16(), labels)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=0.05, abs=1e-3)


def test_unknown_loss_and_bad_arguments_name_the_config_key():
    with pytest.raises(ValueError, match=r"model\.metric_loss.*valid: \['supcon', 'triplet'\]"):
        build_metric_loss("arcfacee")
    with pytest.raises(ValueError, match=r"model\.metric_loss_kwargs"):
        build_metric_loss("supcon", temprature=0.1)
    with pytest.raises(ValueError, match=r"mining.*valid"):
        build_metric_loss("triplet", mining="hardest")
