"""Progressive class-centre triplet loss (PCCT).

Source: K. Chen, W. Lei, R. Zhang, S. Zhao, W.-S. Zheng, R. Wang, "PCCT: Progressive Class-Center
Triplet Loss for Imbalanced Medical Image Classification", IEEE Journal of Biomedical and Health
Informatics 27(4):2026-2036, 2023 (doi:10.1109/JBHI.2023.3240136, arXiv:2207.04793); it extends
W. Lei et al., "Class-Center Involved Triplet Loss for Skin Disease Classification on Imbalanced
Data", ISBI 2020.

What is taken from the paper (its abstract and method overview; the full text with numbered
equations and hyperparameter tables was not retrievable when this was written, so no equation
numbers are cited and the defaults below are ours):

* Two successive stages. Stage 1 trains with a *class-balanced triplet loss*: "triplets are
  sampled equally for each class at each training iteration", which coarsely separates classes.
  Stage 2 uses a *class-centre involved triplet loss*: "the positive and negative samples in each
  triplet are replaced by their corresponding class centers", which makes each class compact.
* The triplet hinge itself is the standard one (Schroff et al., FaceNet, CVPR 2015).

Formulas implemented, with x_i = f_i / ||f_i|| the L2-normalised embedding of sample i (label
y_i), d(u, v) = ||u - v||_2 the (non-squared) Euclidean distance and m the margin:

Stage 1, ``epoch < start_epoch`` (class-balanced triplet loss, all valid batch triplets)::

    T_c  = {(a, p, n) : y_a = y_p = c, p != a, y_n != c}
    l_c  = 1/|T_c| * sum_{(a,p,n) in T_c} max(0, d(x_a, x_p) - d(x_a, x_n) + m)
    L    = sum_{c in K} w_c l_c / sum_{c in K} w_c ,   K = classes with |T_c| > 0

Stage 2, ``epoch >= start_epoch`` (class-centre triplet loss)::

    c^_k = c_k / ||c_k||                       (normalised centre of class k)
    Q_c  = {(a, k) : y_a = c, k in A, k != c}  (A = classes that have a centre, see below)
    l_c  = 1/|Q_c| * sum_{(a,k) in Q_c} max(0, d(x_a, c^_c) - d(x_a, c^_k) + m)
    L    = sum_{c in K} w_c l_c / sum_{c in K} w_c ,   K = classes with |Q_c| > 0

w_c is the class weight set by ``set_class_weights`` (1 for every class when none is set); the
last step is :meth:`MetricLoss.reduce` applied to the per-class means, so each class present in
the batch counts equally (times w_c) however many images it has. A batch where K is empty (e.g.
a single class in stage 1) gives an exact 0 that still carries a gradient.

Choices where the paper's text was not available to us (documented so they can be revisited):

* Class balance. The paper samples the same number of triplets per class. With an m-per-class
  (or any) batch we instead use *all* valid triplets and average per anchor class first, then
  across classes: this equals the expectation of sampling triplets uniformly and equally per
  class, without the sampling noise.
* Negative centres. Every other class centre available is a negative, each counted once
  (``Q_c`` above), rather than only the nearest one: rare classes are negatives as often as
  common ones, in keeping with the class-balanced design. Anchors are all samples of the batch.
* Distance. Euclidean distance between unit vectors (like this project's ``triplet`` loss), not
  the squared distance; a sqrt at 0 is clamped (``sqrt(max(d^2, 1e-12))``), so no NaN.
* Centres. ``center_mode="running_mean"``: buffers ``centers`` (C, D) and ``center_seen`` (C,)
  keep an exponential moving average of the batch means of the *detached, normalised*
  embeddings, updated after the loss is computed, in training mode only (``module.train()``),
  in both stages (so the centres are warm when stage 2 starts)::

      mu_k = mean_{i : y_i = k} x_i.detach()            (classes k in the batch)
      c_k <- momentum * c_k + (1 - momentum) * mu_k     if class k was seen before
      c_k <- mu_k                                       otherwise

  The loss uses the centres as they were before this batch; a class never seen yet uses its
  (detached) batch mean mu_k. Negatives ``A`` are the classes seen before or present in this
  batch; classes never seen are not negatives. Centres carry no gradient. Under DDP with the
  LightningModule's ``gather_across_ranks`` every rank sees the same global batch, so every
  rank's centres stay identical (without it, DDP's buffer broadcast keeps rank 0's).
  ``center_mode="learnable"``: ``centers`` is an ``nn.Parameter`` (C, D) (proxies, randn init),
  trained by the LightningModule's optimiser (it is a parameter of this submodule, so
  ``self.parameters()`` includes it); every class is in ``A``, so a single-class batch still has
  valid class-centre triplets. The proxies are tied into the graph (times 0) in stage 1 too, so
  DDP never sees an unused parameter.
* Defaults: ``margin=0.2`` (as this project's ``triplet`` loss), ``start_epoch=2`` (the shipped
  stage-1 configs train 5 epochs; set it to roughly a third to a half of ``max_epochs``),
  ``momentum=0.9``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmetric.lightning_modules.losses.base import MetricLoss, zero_loss

CENTER_MODES = ("running_mean", "learnable")
_EPS = 1e-12


def euclidean(x: Tensor, y: Tensor) -> Tensor:
    """(N, M) Euclidean distances; exact differences (no 2 - 2cos cancellation), NaN-free at 0."""
    d2 = (x[:, None, :] - y[None, :, :]).pow(2).sum(-1)
    return d2.clamp_min(_EPS).sqrt()


class ClassCenterTripletLoss(MetricLoss):
    """PCCT: class-balanced triplet loss before ``start_epoch``, class-centre triplet loss after.

    Args:
        num_classes: number of class centres (given by the LightningModule).
        embedding_dim: their dimension (given by the LightningModule).
        margin: triplet margin.
        start_epoch: first epoch of the class-centre phase.
        center_mode: ``running_mean`` (momentum-updated buffers) or ``learnable`` (parameters).
        momentum: running-mean momentum of the centres.
    """

    short_name = "class_center_triplet"

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        margin: float = 0.2,
        start_epoch: int = 2,
        center_mode: str = "running_mean",
        momentum: float = 0.9,
    ):
        super().__init__()
        if center_mode not in CENTER_MODES:
            raise ValueError(
                f"unknown center_mode {center_mode!r} (model.metric_loss_kwargs.center_mode); valid: {list(CENTER_MODES)}"
            )
        if num_classes < 1 or embedding_dim < 1:
            raise ValueError(
                f"num_classes and embedding_dim must be >= 1, got {num_classes} and {embedding_dim} "
                "(model.metric_loss_kwargs.num_classes / embedding_dim)"
            )
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin} (model.metric_loss_kwargs.margin)")
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch} (model.metric_loss_kwargs.start_epoch)")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum} (model.metric_loss_kwargs.momentum)")
        self.num_classes = int(num_classes)
        self.embedding_dim = int(embedding_dim)
        self.margin = float(margin)
        self.start_epoch = int(start_epoch)
        self.center_mode = center_mode
        self.momentum = float(momentum)
        if center_mode == "learnable":
            self.centers = nn.Parameter(torch.randn(num_classes, embedding_dim))
        else:
            self.register_buffer("centers", torch.zeros(num_classes, embedding_dim))
            self.register_buffer("center_seen", torch.zeros(num_classes, dtype=torch.bool))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, margin={self.margin}, "
            f"start_epoch={self.start_epoch}, center_mode={self.center_mode!r}, momentum={self.momentum}"
        )

    @property
    def uses_centers(self) -> bool:
        """True from ``start_epoch`` on (stage 2 of PCCT)."""
        return self.epoch >= self.start_epoch

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            emb = embeddings.float()
            x = F.normalize(emb, dim=1)
            labels = labels.long().to(x.device)
            if self.uses_centers:
                loss = self._center_loss(x, labels, emb)
            else:
                loss = self._balanced_triplet_loss(x, labels, emb)
            if self.center_mode == "learnable":
                loss = loss + self.centers.sum() * 0.0  # proxies always in the graph (DDP)
            elif self.training:
                self._update_centers(x.detach(), labels)
            return loss

    def _class_balanced(self, term_sum: Tensor, term_count: Tensor, labels: Tensor, emb: Tensor) -> Tensor:
        """Per-anchor sums and counts -> per-class means -> (class-weighted) mean over classes."""
        sums = term_sum.new_zeros(self.num_classes).index_add(0, labels, term_sum)
        counts = term_count.new_zeros(self.num_classes).index_add(0, labels, term_count)
        valid = counts > 0
        classes = torch.nonzero(valid).flatten()
        means = sums[classes] / counts[classes]
        if classes.numel() == 0:
            return zero_loss(emb)
        return self.reduce(means, classes, emb)

    def _balanced_triplet_loss(self, x: Tensor, labels: Tensor, emb: Tensor) -> Tensor:
        """Sum over all valid (p, n) of relu(d_ap - d_an + m) per anchor, in O(N^2 log N).

        Materialising the (N, N, N) triplet cube would need 4 GB at N = 1024. Instead each
        anchor's negative distances are sorted once; for a positive p, the negatives with
        d_an < d_ap + m are a prefix of that order, so their hinge sum is
        k (d_ap + m) - (sum of the first k sorted d_an), with k from ``searchsorted``. Exact,
        and the gradient flows through the distances exactly as in the cube form.
        """
        dist = euclidean(x, x)
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=x.device)
        pos = same & ~eye  # (a, p)
        neg = ~same  # (a, n)
        sorted_neg, _ = torch.where(neg, dist, torch.full_like(dist, float("inf"))).sort(dim=1)
        prefix = torch.cumsum(torch.where(torch.isfinite(sorted_neg), sorted_neg, torch.zeros_like(sorted_neg)), dim=1)
        prefix = torch.cat([prefix.new_zeros(len(labels), 1), prefix], dim=1)  # prefix[:, k] = sum of first k
        threshold = dist + self.margin  # (a, p)
        k = torch.searchsorted(sorted_neg.detach().contiguous(), threshold.detach().contiguous())
        k = torch.minimum(k, neg.sum(1, keepdim=True))  # inf padding never counts
        hinge = k.to(dist.dtype) * threshold - prefix.gather(1, k)
        hinge = torch.where(pos, hinge, torch.zeros_like(hinge))
        counts = (pos.sum(1) * neg.sum(1)).to(dist.dtype)
        return self._class_balanced(hinge.sum(1), counts, labels, emb)

    def _batch_means(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(C, D) per-class means of ``x`` over the batch and a (C,) mask of classes present."""
        counts = torch.bincount(labels, minlength=self.num_classes).to(x.dtype)
        sums = x.new_zeros(self.num_classes, x.shape[1]).index_add(0, labels, x)
        present = counts > 0
        return sums / counts.clamp_min(1)[:, None], present

    def _current_centers(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Centres (C, D), unnormalised, and the (C,) mask of classes that have one."""
        if self.center_mode == "learnable":
            centers = self.centers.float()
            return centers, torch.ones(self.num_classes, dtype=torch.bool, device=x.device)
        batch_mean, present = self._batch_means(x.detach(), labels)
        seen = self.center_seen.to(x.device)
        centers = torch.where(seen[:, None], self.centers.to(x.device).float(), batch_mean)
        return centers, seen | present

    def _center_loss(self, x: Tensor, labels: Tensor, emb: Tensor) -> Tensor:
        centers, available = self._current_centers(x, labels)
        dist = euclidean(x, F.normalize(centers, dim=1))  # (N, C)
        d_pos = dist.gather(1, labels[:, None])  # (N, 1)
        own = F.one_hot(labels, self.num_classes).bool()
        valid = available[None, :] & ~own  # (N, C): negative centres
        hinge = F.relu(d_pos - dist + self.margin)
        hinge = torch.where(valid, hinge, torch.zeros_like(hinge))
        return self._class_balanced(hinge.sum(1), valid.sum(1).float(), labels, emb)

    @torch.no_grad()
    def _update_centers(self, x: Tensor, labels: Tensor) -> None:
        batch_mean, present = self._batch_means(x, labels)
        old = self.centers.float()
        seen = self.center_seen
        blended = self.momentum * old + (1.0 - self.momentum) * batch_mean
        new = torch.where(seen[:, None], blended, batch_mean)
        new = torch.where(present[:, None], new, old)
        self.centers.copy_(new.to(self.centers.dtype))
        self.center_seen |= present
