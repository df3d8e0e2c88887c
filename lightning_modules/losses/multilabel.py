"""Imbalance-aware multi-label losses: ``loss(logits (N, C), targets (N, C) multi-hot)``.

Each label c is a binary problem with ``n+_c`` positive and ``n-_c = N_train - n+_c``
negative training images (the DataModule's ``class_counts`` and ``num_train_images``). Built
by name: ``build_multilabel_loss(model.loss, positive_counts, num_samples, **model.loss_kwargs)``.

=======================  ===================================================================
``bce``                  binary cross-entropy, optional per-label ``pos_weight = n-_c / n+_c``
``class_balanced_bce``   BCE with effective-number weights (Cui et al., CVPR 2019)
``asymmetric``           asymmetric loss, ASL (Ridnik et al., ICCV 2021)
``logit_adjusted_bce``   BCE on logits shifted by tau x the label's prior log-odds (Menon et
                         al., ICLR 2021, applied per label)
=======================  ===================================================================

Shared conventions: ``p = sigmoid(z)``; the reduction is the mean over all N x C elements
(``mean`` of ``F.binary_cross_entropy_with_logits``), so the losses are on one scale; counts
of 0 are clamped to 1 inside logarithms and ratios, so no label produces NaN or inf. The loss
is computed in at least float32 with autocast off. Each formula is checked against a float64
loop in tests/test_multilabel_losses.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KWARGS_KEY = "model.loss_kwargs"


class MultiLabelLoss(nn.Module):
    """Base: holds ``positives`` (n+_c) and ``negatives`` (n-_c) as float64 buffers."""

    def __init__(self, positive_counts, num_samples: int):
        super().__init__()
        positives = torch.as_tensor(positive_counts, dtype=torch.float64).flatten()
        if positives.numel() == 0 or (positives < 0).any() or (positives != positives.round()).any():
            raise ValueError(f"positive_counts must be non-negative integers per label, got {positives.tolist()}")
        if int(num_samples) < 1 or (positives > int(num_samples)).any():
            raise ValueError(f"num_samples={num_samples} must be >= 1 and >= every positive count {positives.tolist()}")
        self.register_buffer("positives", positives, persistent=False)
        self.register_buffer("negatives", float(num_samples) - positives, persistent=False)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if logits.shape != targets.shape or logits.ndim != 2 or logits.shape[1] != self.positives.numel():
            raise ValueError(
                f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must both be (N, {self.positives.numel()})"
            )
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self.compute(logits.to(dtype), targets.to(dtype))

    def compute(self, logits: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError


class BCELoss(MultiLabelLoss):
    """``l = -[w_c y log p + (1 - y) log(1 - p)]``, ``w_c = n-_c / max(n+_c, 1)`` with
    ``pos_weight=True`` (the usual positive re-weighting, e.g. torch's ``pos_weight``), else 1."""

    def __init__(self, positive_counts, num_samples: int, pos_weight: bool = False):
        super().__init__(positive_counts, num_samples)
        if not isinstance(pos_weight, bool):
            raise ValueError(f"pos_weight must be true or false, got {pos_weight!r} ({KWARGS_KEY})")
        self.use_pos_weight = pos_weight

    def compute(self, logits: Tensor, targets: Tensor) -> Tensor:
        weight = (self.negatives / self.positives.clamp(min=1)).to(logits.dtype) if self.use_pos_weight else None
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight)


class ClassBalancedBCELoss(MultiLabelLoss):
    """Class-balanced BCE (Cui et al., "Class-Balanced Loss Based on Effective Number of
    Samples", CVPR 2019, eq. 3 and the sigmoid CB loss of their sec. 4).

    ``l = -[w+_c y log p + w-_c (1 - y) log(1 - p)]`` with effective-number weights
    ``w+_c = (1 - beta) / (1 - beta^n+_c)`` and ``w-_c = (1 - beta) / (1 - beta^n-_c)``,
    normalised so the non-empty weights average 1 (Cui's ``sum w = C``; a count of 0 gets weight
    0). Multi-label adaptation: each label's positives and negatives are its two "classes", so
    a rare finding's positives are up-weighted against its many negatives.
    """

    def __init__(self, positive_counts, num_samples: int, beta: float = 0.999):
        super().__init__(positive_counts, num_samples)
        if not 0 <= float(beta) < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta!r} ({KWARGS_KEY})")
        counts = torch.stack([self.positives, self.negatives])
        weights = torch.where(counts > 0, (1 - beta) / (1 - float(beta) ** counts.clamp(min=1)), torch.zeros_like(counts))
        weights = weights * (counts > 0).sum() / weights.sum()
        self.register_buffer("weights", weights, persistent=False)  # (2, C): positive row, negative row

    def compute(self, logits: Tensor, targets: Tensor) -> Tensor:
        w_pos, w_neg = self.weights.to(logits.dtype)
        element = -(w_pos * targets * F.logsigmoid(logits) + w_neg * (1 - targets) * F.logsigmoid(-logits))
        return element.mean()


class AsymmetricLoss(MultiLabelLoss):
    """Asymmetric loss (Ridnik et al., "Asymmetric Loss for Multi-Label Classification", ICCV
    2021, eqs. 3-5; the official code's clipping and eps)::

        p_m = max(p - clip, 0)                      (probability shifting of easy negatives)
        L+  = (1 - p)^gamma_pos * log(max(p, eps))
        L-  = p_m^gamma_neg * log(max(1 - p_m, eps))
        l   = -[y L+ + (1 - y) L-]

    Negatives are focused harder (gamma_neg > gamma_pos) and very easy negatives (p < clip)
    are discarded, so the many negatives of a rare finding do not dominate. Gradients flow
    through the focusing weights (the paper's formulation). Mean over elements (the official
    code sums; only the scale differs).
    """

    def __init__(self, positive_counts, num_samples: int, gamma_neg: float = 4.0, gamma_pos: float = 1.0,
                 clip: float = 0.05, eps: float = 1e-8):  # fmt: skip
        super().__init__(positive_counts, num_samples)
        for name, value in (("gamma_neg", gamma_neg), ("gamma_pos", gamma_pos)):
            if not float(value) >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r} ({KWARGS_KEY})")
        if not 0 <= float(clip) < 1:
            raise ValueError(f"clip must be in [0, 1), got {clip!r} ({KWARGS_KEY})")
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = float(gamma_neg), float(gamma_pos), float(clip), float(eps)

    def compute(self, logits: Tensor, targets: Tensor) -> Tensor:
        p = torch.sigmoid(logits)
        p_m = (p - self.clip).clamp(min=0) if self.clip > 0 else p
        loss_pos = (1 - p).pow(self.gamma_pos) * torch.log(p.clamp(min=self.eps))
        loss_neg = p_m.pow(self.gamma_neg) * torch.log((1 - p_m).clamp(min=self.eps))
        return -(targets * loss_pos + (1 - targets) * loss_neg).mean()


class LogitAdjustedBCELoss(MultiLabelLoss):
    """Logit-adjusted BCE: Menon et al., "Long-tail learning via logit adjustment", ICLR 2021
    (eq. 10, logit-adjusted loss), applied to each label's binary problem::

        z'_c = z_c + tau * log(pi_c / (1 - pi_c)),  pi_c / (1 - pi_c) = max(n+_c, 1) / max(n-_c, 1)
        l    = BCE(z'_c, y)

    during training only; at evaluation the raw logits z are used, so rare findings are no
    longer penalised by their low prior. This follows the paper's softmax recipe transferred to
    sigmoids (a prior log-odds offset), not an equation of the paper.
    """

    def __init__(self, positive_counts, num_samples: int, tau: float = 1.0):
        super().__init__(positive_counts, num_samples)
        if not math.isfinite(float(tau)):
            raise ValueError(f"tau must be a finite number, got {tau!r} ({KWARGS_KEY})")
        self.tau = float(tau)
        log_odds = torch.log(self.positives.clamp(min=1)) - torch.log(self.negatives.clamp(min=1))
        self.register_buffer("log_odds", log_odds, persistent=False)

    def compute(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits + self.tau * self.log_odds.to(logits.dtype), targets)


MULTILABEL_LOSSES: dict[str, type[MultiLabelLoss]] = {
    "bce": BCELoss,
    "class_balanced_bce": ClassBalancedBCELoss,
    "asymmetric": AsymmetricLoss,
    "logit_adjusted_bce": LogitAdjustedBCELoss,
}


def build_multilabel_loss(name: str, positive_counts, num_samples: int, **kwargs) -> MultiLabelLoss:
    """``MULTILABEL_LOSSES[name](positive_counts, num_samples, **kwargs)`` with errors naming
    the config keys (``model.loss``, ``model.loss_kwargs``)."""
    if name not in MULTILABEL_LOSSES:
        raise ValueError(f"unknown multi-label loss {name!r} (model.loss); valid: {sorted(MULTILABEL_LOSSES)}")
    try:
        return MULTILABEL_LOSSES[name](positive_counts, num_samples, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for loss {name!r} ({KWARGS_KEY}): {err}") from err
