"""Multi-label losses against float64 loops written from the papers' formulas (values and
gradients), plus their argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from medmetric.lightning_modules.losses.multilabel import MULTILABEL_LOSSES, build_multilabel_loss

POSITIVES = [30, 5, 0, 90]  # label 2 has no positive (GZSL-like), label 3 is common
NUM_SAMPLES = 100


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def naive_bce(logits, targets, pos_weight: bool):
    total = 0.0
    for i in range(len(logits)):
        for c in range(len(logits[0])):
            p, y = sigmoid(logits[i][c]), targets[i][c]
            w = (NUM_SAMPLES - POSITIVES[c]) / max(POSITIVES[c], 1) if pos_weight else 1.0
            total += -(w * y * math.log(p) + (1 - y) * math.log(1 - p))
    return total / (len(logits) * len(logits[0]))


def naive_class_balanced(logits, targets, beta: float):
    raw = {}
    for c, pos in enumerate(POSITIVES):
        for sign, n in (("+", pos), ("-", NUM_SAMPLES - pos)):
            raw[c, sign] = (1 - beta) / (1 - beta**n) if n > 0 else 0.0
    nonzero = [w for w in raw.values() if w > 0]
    scale = len(nonzero) / sum(nonzero)
    total = 0.0
    for i in range(len(logits)):
        for c in range(len(logits[0])):
            p, y = sigmoid(logits[i][c]), targets[i][c]
            total += -(scale * raw[c, "+"] * y * math.log(p) + scale * raw[c, "-"] * (1 - y) * math.log(1 - p))
    return total / (len(logits) * len(logits[0]))


def naive_asymmetric(logits, targets, gamma_neg, gamma_pos, clip, eps=1e-8):
    total = 0.0
    for i in range(len(logits)):
        for c in range(len(logits[0])):
            p, y = sigmoid(logits[i][c]), targets[i][c]
            p_m = max(p - clip, 0.0)
            if y == 1:
                total += -((1 - p) ** gamma_pos) * math.log(max(p, eps))
            else:
                total += -(p_m**gamma_neg) * math.log(max(1 - p_m, eps))
    return total / (len(logits) * len(logits[0]))


def naive_logit_adjusted(logits, targets, tau):
    total = 0.0
    for i in range(len(logits)):
        for c in range(len(logits[0])):
            prior_odds = max(POSITIVES[c], 1) / max(NUM_SAMPLES - POSITIVES[c], 1)
            p, y = sigmoid(logits[i][c] + tau * math.log(prior_odds)), targets[i][c]
            total += -(y * math.log(p) + (1 - y) * math.log(1 - p))
    return total / (len(logits) * len(logits[0]))


CASES = [
    ("bce", {}, lambda z, y: naive_bce(z, y, False)),
    ("bce", {"pos_weight": True}, lambda z, y: naive_bce(z, y, True)),
    ("class_balanced_bce", {"beta": 0.99}, lambda z, y: naive_class_balanced(z, y, 0.99)),
    ("asymmetric", {}, lambda z, y: naive_asymmetric(z, y, 4.0, 1.0, 0.05)),
    ("asymmetric", {"gamma_neg": 2, "gamma_pos": 0, "clip": 0.0}, lambda z, y: naive_asymmetric(z, y, 2.0, 0.0, 0.0)),
    ("logit_adjusted_bce", {"tau": 1.0}, lambda z, y: naive_logit_adjusted(z, y, 1.0)),
    ("logit_adjusted_bce", {"tau": 0.5}, lambda z, y: naive_logit_adjusted(z, y, 0.5)),
]


def naive_gradient(reference, logits, targets, h=1e-6):
    """Central finite differences of the float64 loop."""
    grad = [[0.0] * len(logits[0]) for _ in logits]
    for i in range(len(logits)):
        for c in range(len(logits[0])):
            up = [row[:] for row in logits]
            down = [row[:] for row in logits]
            up[i][c] += h
            down[i][c] -= h
            grad[i][c] = (reference(up, targets) - reference(down, targets)) / (2 * h)
    return torch.tensor(grad, dtype=torch.float64)


@pytest.mark.parametrize(("name", "kwargs", "reference"), CASES)
def test_loss_and_gradient_match_float64_loop(name, kwargs, reference):
    generator = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(6, 4, generator=generator, dtype=torch.float64)).requires_grad_(True)
    targets = (torch.rand(6, 4, generator=generator) < 0.4).double()
    targets[:, 2] = 0  # the label without training positives has none in the batch either
    loss = build_multilabel_loss(name, POSITIVES, NUM_SAMPLES, **kwargs)
    value = loss(logits, targets)
    value.backward()
    expected = reference(logits.tolist(), targets.tolist())
    assert value.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert torch.allclose(logits.grad, naive_gradient(reference, logits.tolist(), targets.tolist()), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", sorted(MULTILABEL_LOSSES))
def test_float32_and_extreme_logits_stay_finite(name):
    logits = torch.tensor([[80.0, -80.0, 0.0, 30.0], [-80.0, 80.0, 1.0, -30.0]], requires_grad=True)
    targets = torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    value = build_multilabel_loss(name, POSITIVES, NUM_SAMPLES)(logits, targets)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value) and torch.isfinite(logits.grad).all()


def test_bce_without_weights_equals_torch_bce():
    logits, targets = torch.randn(5, 4), (torch.rand(5, 4) < 0.5).float()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert torch.allclose(build_multilabel_loss("bce", POSITIVES, NUM_SAMPLES)(logits, targets), expected)


def test_bad_arguments_name_the_config_key():
    with pytest.raises(ValueError, match=r"model\.loss\b.*valid"):
        build_multilabel_loss("focal", POSITIVES, NUM_SAMPLES)
    with pytest.raises(ValueError, match=r"model\.loss_kwargs"):
        build_multilabel_loss("asymmetric", POSITIVES, NUM_SAMPLES, gamma=2)
    with pytest.raises(ValueError, match=r"beta.*model\.loss_kwargs"):
        build_multilabel_loss("class_balanced_bce", POSITIVES, NUM_SAMPLES, beta=1.0)
    with pytest.raises(ValueError, match="num_samples"):
        build_multilabel_loss("bce", POSITIVES, 50)  # 90 positives cannot come from 50 images
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        build_multilabel_loss("bce", POSITIVES, NUM_SAMPLES)(torch.zeros(2, 3), torch.zeros(2, 3))
