"""Cross-modal losses against float64 naive loops (values and gradients), plus edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from medmetric.lightning_modules.losses.cross_modal import (
    CROSS_MODAL_LOSSES,
    DualWeightedMetricLoss,
    WeightedFocusedEuclideanLoss,
    build_cross_modal_loss,
)


def naive_wfe(z, t, y, margin, gamma, tau, alpha):
    """One (image, label) pair at a time, in plain Python floats for the weights."""
    pos_sum = neg_sum = z.new_zeros(())
    n_pos = n_neg = 0
    for i in range(z.shape[0]):
        for c in range(t.shape[0]):
            d = torch.sqrt(((z[i] - t[c]) ** 2).sum() + 1e-12)
            s = math.exp(-(d.item() ** 2) / tau)  # a constant weight, as in the loss
            if y[i, c] == 1:
                pos_sum = pos_sum + (1 - s) ** gamma * d**2
                n_pos += 1
            else:
                neg_sum = neg_sum + s**gamma * max(margin - d, 0 * d) ** 2
                n_neg += 1
    return alpha * pos_sum / max(1, n_pos) + (1 - alpha) * neg_sum / max(1, n_neg)


def naive_softmax(values):
    if not values:
        return []
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def naive_dwm(z, t, y, margin, temperature, alpha, image_weight):
    B, C = y.shape
    d = [[torch.sqrt(((z[i] - t[c]) ** 2).sum() + 1e-12) for c in range(C)] for i in range(B)]
    loss = [[d[i][c] ** 2 if y[i, c] == 1 else max(margin - d[i][c], 0 * d[i][c]) ** 2 for c in range(C)] for i in range(B)]

    def side_loss(pairs):  # pairs: list of (i, c) in one row or column
        total = z.new_zeros(())
        for sign, part_weight in ((1, alpha), (0, 1 - alpha)):
            members = [(i, c) for i, c in pairs if y[i, c] == sign]
            hard = [(d[i][c].item() if sign else -d[i][c].item()) / temperature for i, c in members]
            for (i, c), w in zip(members, naive_softmax(hard), strict=True):
                total = total + part_weight * w * loss[i][c]
        return total

    rows = sum(side_loss([(i, c) for c in range(C)]) for i in range(B)) / B
    cols = sum(side_loss([(i, c) for i in range(B)]) for c in range(C)) / C
    return image_weight * rows + (1 - image_weight) * cols


def _inputs(seed=0, B=7, C=5, D=6, p=0.3):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, D, generator=g, dtype=torch.float64) * 0.6
    t = torch.nn.functional.normalize(torch.randn(C, D, generator=g, dtype=torch.float64), dim=1)
    y = (torch.rand(B, C, generator=g) < p).float()
    y[0] = 0  # an image with no finding
    y[1] = 1  # an image with every label
    return z, t, y


CASES = [
    ("wfe", dict(margin=1.0, gamma=2.0, tau=1.0, alpha=0.5)),
    ("wfe", dict(margin=1.5, gamma=0.0, tau=0.5, alpha=0.25)),
    ("dwm", dict(margin=1.0, temperature=0.5, alpha=0.5, image_weight=0.5)),
    ("dwm", dict(margin=1.4, temperature=2.0, alpha=0.7, image_weight=0.2)),
]


@pytest.mark.parametrize(("kind", "kwargs"), CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_naive_loop_values_and_gradients(kind, kwargs, seed):
    z, t, y = _inputs(seed)
    loss_cls, naive = (WeightedFocusedEuclideanLoss, naive_wfe) if kind == "wfe" else (DualWeightedMetricLoss, naive_dwm)
    z1, t1 = z.clone().requires_grad_(), t.clone().requires_grad_()
    # the module computes distances in float32; feed float32 and compare to the float64 loop
    ours = loss_cls(**kwargs)(z1.float(), t1.float(), y)
    ours.backward()
    z2, t2 = z.clone().requires_grad_(), t.clone().requires_grad_()
    reference = naive(z2, t2, y, **kwargs)
    reference.backward()
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-4, atol=1e-6)
    assert ours.item() > 0


@pytest.mark.parametrize("name", sorted(CROSS_MODAL_LOSSES))
@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_all_negative_or_all_positive_batch_is_finite_and_matches_loop(name, fill):
    z, t, y = _inputs(3)
    y = torch.full_like(y, fill)
    loss = build_cross_modal_loss(name)
    z1 = z.float().requires_grad_()
    value = loss(z1, t.float(), y)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0
    naive = naive_wfe if name == "weighted_focused_euclidean" else naive_dwm
    defaults = (dict(margin=1.0, gamma=2.0, tau=1.0, alpha=0.5) if name == "weighted_focused_euclidean"
                else dict(margin=1.0, temperature=0.5, alpha=0.5, image_weight=0.5))
    assert value.item() == pytest.approx(naive(z, t, y, **defaults).item(), rel=1e-5)


@pytest.mark.parametrize("name", sorted(CROSS_MODAL_LOSSES))
def test_embedding_on_a_prototype_gives_finite_gradient(name):
    """d = 0 exactly (an embedding equal to its prototype): no NaN from the square root."""
    t = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    z = t[:2].clone().requires_grad_()
    y = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    value = build_cross_modal_loss(name)(z, t, y)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(z.grad).all()


def test_hard_pairs_weigh_more_than_easy_ones():
    """Focal weighting: the gradient on a far positive exceeds a plain-contrastive share, a near one's shrinks."""
    t = torch.tensor([[1.0, 0.0]])
    y = torch.ones(2, 1)
    z = torch.tensor([[0.9, 0.0], [-0.5, 0.0]], requires_grad=True)  # easy (near), hard (far)
    WeightedFocusedEuclideanLoss(gamma=2.0)(z, t, y).backward()
    focal = z.grad.norm(dim=1)
    z.grad = None
    WeightedFocusedEuclideanLoss(gamma=0.0)(z, t, y).backward()
    plain = z.grad.norm(dim=1)
    assert focal[0] / plain[0] < focal[1] / plain[1]


def test_balance_keeps_many_negatives_from_dominating():
    """With alpha=0.5 one positive pair counts as much as all 13 negatives together."""
    t = torch.nn.functional.normalize(torch.randn(14, 16), dim=1)
    z = torch.randn(1, 16, requires_grad=True)
    y = torch.zeros(1, 14)
    y[0, 3] = 1
    loss = WeightedFocusedEuclideanLoss(gamma=0.0, alpha=0.5)
    d = torch.cdist(z.detach(), t)[0]
    negatives = torch.cat([d[:3], d[4:]])
    expected = 0.5 * d[3] ** 2 + 0.5 * ((1 - negatives).clamp_min(0) ** 2).sum() / 13
    assert loss(z, t, y).item() == pytest.approx(expected.item(), rel=1e-5)


def test_bad_arguments_fail_with_the_config_key():
    with pytest.raises(ValueError, match="model.loss"):
        build_cross_modal_loss("weighted_focal_euclidean")
    with pytest.raises(ValueError, match="model.loss_kwargs"):
        build_cross_modal_loss("dual_weighted_metric", gamma=2.0)
    with pytest.raises(ValueError, match="same D"):
        WeightedFocusedEuclideanLoss()(torch.zeros(2, 3), torch.zeros(4, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="one column per prototype"):
        DualWeightedMetricLoss()(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, 5))
