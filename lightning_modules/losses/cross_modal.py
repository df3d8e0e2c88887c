"""Cross-modal metric losses: image embeddings against label-text prototypes (multi-label).

Every loss is called as ``loss(embeddings (B, D), prototypes (C, D), targets (B, C))`` with
multi-hot ``targets`` and returns a scalar. Only the prototypes of labels seen in training are
passed in (the module slices them), so unseen labels' texts never reach the training loss.

Notation shared by the docstrings: ``z_i`` an image embedding, ``t_c`` the text prototype of
label c, ``d_ic = ||z_i - t_c||_2`` (computed as ``sqrt(sum + eps)`` so the gradient is finite
at ``d = 0``), ``y_ic`` in {0, 1}, ``P`` / ``N`` the positive / negative (image, label) pairs,
``m`` a margin, ``[x]_+ = max(x, 0)``. Pair weights are treated as constants in the backward
pass (``detach``): they decide how much a pair counts, not which way it moves.

The two papers' exact equations were not available offline: both definitions below follow the
papers' descriptions (quoted in each docstring), not their equations.
"""

from __future__ import annotations

import difflib

import torch
from torch import Tensor, nn

EPS = 1e-12


def pairwise_euclidean(embeddings: Tensor, prototypes: Tensor) -> Tensor:
    """(B, C) Euclidean distances in float32 (also under bf16/fp16 autocast)."""
    diff = embeddings.float()[:, None, :] - prototypes.float()[None, :, :]
    return diff.pow(2).sum(-1).clamp_min(EPS).sqrt()


def _check_inputs(embeddings: Tensor, prototypes: Tensor, targets: Tensor) -> Tensor:
    if embeddings.ndim != 2 or prototypes.ndim != 2 or embeddings.shape[1] != prototypes.shape[1]:
        raise ValueError(f"embeddings {tuple(embeddings.shape)} and prototypes {tuple(prototypes.shape)} "
                         "must be (B, D) and (C, D) with the same D")
    if targets.shape != (embeddings.shape[0], prototypes.shape[0]):
        raise ValueError(f"targets {tuple(targets.shape)} must be (B, C) = "
                         f"({embeddings.shape[0]}, {prototypes.shape[0]}): one column per prototype")
    return targets.float() > 0.5


class WeightedFocusedEuclideanLoss(nn.Module):
    """Weighted focused Euclidean distance metric loss (CM-DML-GZSL).

    Jin, Lu, Li, Wang. "A cross-modal deep metric learning model for disease diagnosis based on
    chest x-ray images", Multimedia Tools and Applications, 2023 (doi:10.1007/s11042-023-14790-7).
    The paper describes a loss on Euclidean distances between an image's regressed semantic
    vector and the label text vectors that "dynamically increase[s] the weight of hard samples
    and decrease[s] the weight of simple samples" and promotes the connection to the positive
    labels' vectors despite the many negatives. Implemented (our definition, following that
    description, not the paper's equation)::

        s_ic  = exp(-d_ic^2 / tau)                      kernel similarity in (0, 1]
        l+_ic = (1 - s_ic)^gamma * d_ic^2               positive pair: far (hard) counts more
        l-_ic = s_ic^gamma * [m - d_ic]_+^2              negative pair: near (hard) counts more
        L = alpha * sum_P l+ / max(1, |P|) + (1 - alpha) * sum_N l- / max(1, |N|)

    The focal factors ``(1 - s)^gamma`` and ``s^gamma`` (Lin et al. 2017's modulating factor on a
    distance-based similarity) raise hard pairs and lower easy ones; ``gamma = 0`` gives the plain
    contrastive Euclidean loss. Averaging positives and negatives separately and mixing them with
    ``alpha`` is the positive/negative balance: with 1-2 positives and a dozen negatives per
    image, the negatives cannot dominate. A batch without positives (or negatives) gives only
    the other term.
    """

    def __init__(self, margin: float = 1.0, gamma: float = 2.0, tau: float = 1.0, alpha: float = 0.5):
        super().__init__()
        if margin <= 0 or gamma < 0 or tau <= 0 or not 0 <= alpha <= 1:
            raise ValueError(f"weighted_focused_euclidean needs margin > 0, gamma >= 0, tau > 0, 0 <= alpha <= 1; "
                             f"got margin={margin}, gamma={gamma}, tau={tau}, alpha={alpha} (model.loss_kwargs)")
        self.margin, self.gamma, self.tau, self.alpha = margin, gamma, tau, alpha

    def forward(self, embeddings: Tensor, prototypes: Tensor, targets: Tensor) -> Tensor:
        positive = _check_inputs(embeddings, prototypes, targets)
        dist = pairwise_euclidean(embeddings, prototypes)
        similarity = torch.exp(-dist.pow(2) / self.tau).detach()
        pos_loss = (1 - similarity).pow(self.gamma) * dist.pow(2)
        neg_loss = similarity.pow(self.gamma) * (self.margin - dist).clamp_min(0).pow(2)
        pos = (pos_loss * positive).sum() / positive.sum().clamp_min(1)
        neg = (neg_loss * ~positive).sum() / (~positive).sum().clamp_min(1)
        return self.alpha * pos + (1 - self.alpha) * neg


class DualWeightedMetricLoss(nn.Module):
    """Dual-weighted metric loss: image-level and disease-level weighting of the same pairs.

    Jin, Lu, Zhu, Li, Wang. Computers in Biology and Medicine 157:106683, 2023 (chest X-ray,
    cross-modal metric learning for generalised zero-shot diagnosis). The paper describes
    weighting the image-to-label-prototype relation twice: at the image level and at the
    disease (category) level. Implemented (our definition, following that description, not the
    paper's equation), on the (B, C) matrix of pair losses::

        l_ic = d_ic^2 if y_ic = 1, else [m - d_ic]_+^2
        image level (each row i, a softmax over that image's labels):
            a+_ic = softmax_{c: y_ic=1}( d_ic / T),  a-_ic = softmax_{c: y_ic=0}(-d_ic / T)
            L_i = alpha * sum_c a+_ic l_ic + (1 - alpha) * sum_c a-_ic l_ic
        disease level (each column c, a softmax over the batch's images):
            b+_ic = softmax_{i: y_ic=1}( d_ic / T),  b-_ic = softmax_{i: y_ic=0}(-d_ic / T)
            L_c = alpha * sum_i b+_ic l_ic + (1 - alpha) * sum_i b-_ic l_ic
        L = lambda_img * mean_i L_i + (1 - lambda_img) * mean_c L_c

    The softmax weights (temperature ``T``; ``T -> inf`` is a plain mean, ``T -> 0`` the hardest
    pair) put the hard pairs first: within an image, its farthest positive label and nearest
    negative one; within a disease, its worst-placed images, so a rare disease's few positives
    are not averaged away among the images of common ones. Positives and negatives are
    normalised separately in both directions (the positive/negative balance). An empty side (an
    image with no finding, a disease absent from the batch) contributes zero for that side.
    """

    def __init__(self, margin: float = 1.0, temperature: float = 0.5, alpha: float = 0.5, image_weight: float = 0.5):
        super().__init__()
        if margin <= 0 or temperature <= 0 or not 0 <= alpha <= 1 or not 0 <= image_weight <= 1:
            raise ValueError("dual_weighted_metric needs margin > 0, temperature > 0, 0 <= alpha <= 1, "
                             f"0 <= image_weight <= 1; got margin={margin}, temperature={temperature}, "
                             f"alpha={alpha}, image_weight={image_weight} (model.loss_kwargs)")
        self.margin, self.temperature, self.alpha, self.image_weight = margin, temperature, alpha, image_weight

    def forward(self, embeddings: Tensor, prototypes: Tensor, targets: Tensor) -> Tensor:
        positive = _check_inputs(embeddings, prototypes, targets)
        dist = pairwise_euclidean(embeddings, prototypes)
        pair_loss = torch.where(positive, dist.pow(2), (self.margin - dist).clamp_min(0).pow(2))
        hardness = torch.where(positive, dist, -dist).detach() / self.temperature
        image_level = self._balanced(pair_loss, hardness, positive, dim=1)  # (B,)
        disease_level = self._balanced(pair_loss, hardness, positive, dim=0)  # (C,)
        return self.image_weight * image_level.mean() + (1 - self.image_weight) * disease_level.mean()

    def _balanced(self, pair_loss: Tensor, hardness: Tensor, positive: Tensor, dim: int) -> Tensor:
        pos = (masked_softmax(hardness, positive, dim) * pair_loss).sum(dim)
        neg = (masked_softmax(hardness, ~positive, dim) * pair_loss).sum(dim)
        return self.alpha * pos + (1 - self.alpha) * neg


def masked_softmax(logits: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Softmax over the entries where ``mask`` holds; all-zero where a slice has none."""
    filled = logits.masked_fill(~mask, float("-inf"))
    top = filled.amax(dim, keepdim=True).clamp_min(torch.finfo(logits.dtype).min)  # finite for empty slices
    weights = torch.exp(filled - top) * mask
    return weights / weights.sum(dim, keepdim=True).clamp_min(torch.finfo(logits.dtype).tiny)


CROSS_MODAL_LOSSES: dict[str, type[nn.Module]] = {
    "weighted_focused_euclidean": WeightedFocusedEuclideanLoss,
    "dual_weighted_metric": DualWeightedMetricLoss,
}


def build_cross_modal_loss(name: str, **kwargs) -> nn.Module:
    """``build_cross_modal_loss("weighted_focused_euclidean", gamma=2.0)`` -> nn.Module."""
    if name not in CROSS_MODAL_LOSSES:
        close = difflib.get_close_matches(name, CROSS_MODAL_LOSSES, n=3)
        raise ValueError(f"unknown cross-modal loss {name!r} (model.loss); valid: {sorted(CROSS_MODAL_LOSSES)}"
                         + (f"; did you mean {close[0]!r}?" if close else ""))
    try:
        return CROSS_MODAL_LOSSES[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad model.loss_kwargs for {name!r}: {err}") from err
