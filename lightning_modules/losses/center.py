"""Center loss (Wen et al., "A Discriminative Feature Learning Approach for Deep Face Recognition",
ECCV 2016), meant as an auxiliary term next to cross-entropy.

The paper's eq. 2 over a mini-batch of m samples, with x_i the deep feature of sample i and
c_{y_i} the centre of its class::

    L_C = 1/2 * sum_{i=1..m} || x_i - c_{y_i} ||_2^2

Implemented here as the *mean* over the batch (class-weighted when ``set_class_weights`` is
used, via :meth:`MetricLoss.reduce`)::

    L = sum_i w_{y_i} * 1/2 ||x_i - c_{y_i}||^2 / sum_i w_{y_i}     (w = 1: L_C / m)

so the scale does not depend on the batch size; the paper's lambda (L = L_S + lambda L_C, eq. 5)
is this project's ``metric_weight``.

Centres are an ``nn.Parameter`` (num_classes, embedding_dim), initialised at 0 (our choice: with
unit-norm embeddings the initial loss is then 1/2 per sample, not dominated by random centres),
and trained by the LightningModule's optimiser together with the network. This *emulates* the paper's separate update (eq. 4, c_j <- c_j - alpha * Delta c_j with
Delta c_j = sum_i [y_i = j](c_j - x_i) / (1 + sum_i [y_i = j])) rather than reproducing it:
the gradient of L w.r.t. c_j is sum_{i: y_i = j}(c_j - x_i) / m, so alpha's role is taken by the
optimiser's learning rate (and weight decay, if any, also acts on the centres).

Embeddings are used as passed (the paper applies the loss to un-normalised features; in this
project they arrive L2-normalised from the projector). Computed in float32 under autocast; an
empty batch gives an exact 0 with a gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medmetric.lightning_modules.losses.base import MetricLoss


class CenterLoss(MetricLoss):
    """1/2 ||x_i - c_{y_i}||^2 averaged over the batch, learnable class centres.

    Args:
        num_classes: number of centres (given by the LightningModule).
        embedding_dim: their dimension (given by the LightningModule).
    """

    short_name = "center"

    def __init__(self, num_classes: int, embedding_dim: int):
        super().__init__()
        if num_classes < 1 or embedding_dim < 1:
            raise ValueError(
                f"num_classes and embedding_dim must be >= 1, got {num_classes} and {embedding_dim} "
                "(model.metric_loss_kwargs.num_classes / embedding_dim)"
            )
        self.num_classes = int(num_classes)
        self.embedding_dim = int(embedding_dim)
        self.centers = nn.Parameter(torch.zeros(num_classes, embedding_dim))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}"

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = embeddings.float()
            labels = labels.long().to(x.device)
            centers = self.centers.float()
            per_sample = 0.5 * (x - centers[labels]).pow(2).sum(1)
            # centres tied into the graph even for an empty batch (DDP sees every parameter used)
            return self.reduce(per_sample, labels, x) + centers.sum() * 0.0
