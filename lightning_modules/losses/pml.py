"""pytorch-metric-learning losses behind one call signature, computed in float32.

Each factory takes ``num_classes`` and ``embedding_dim`` (proxy and classifier-style losses need
them; the others ignore them) plus the loss's own arguments, and returns a :class:`PMLLoss`.
Losses that own weights (proxies, ArcFace's W, SoftTriple's centres) keep them as parameters of
the wrapped loss, hence of the LightningModule, hence in its optimizer.
"""

from __future__ import annotations

import torch
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.reducers import AvgNonZeroReducer, BaseReducer, MultipleReducers
from torch import Tensor, nn

from medmetric.lightning_modules.losses.base import MetricLossBase


class ClassWeightedReducer(BaseReducer):
    """Averages per-element/pair/triplet losses weighted by the class of each term's anchor.

    ``nonzero_only`` mirrors PML's AvgNonZeroReducer (average over positive terms), otherwise
    MeanReducer; with all weights equal it reproduces that default exactly.
    """

    def __init__(self, nonzero_only: bool, **kwargs):
        super().__init__(**kwargs)
        self.nonzero_only = nonzero_only
        self.class_weights: Tensor | None = None

    def _weighted_mean(self, losses: Tensor, anchors: Tensor, embeddings: Tensor, labels: Tensor) -> Tensor:
        losses = losses.reshape(-1)  # matrix-based losses hand over (N, 1)
        if self.nonzero_only:
            keep = losses > 0
            losses, anchors = losses[keep], anchors[keep]
        if losses.numel() == 0:
            return self.zero_loss(embeddings)
        if self.class_weights is None:
            return losses.mean()
        weights = self.class_weights.to(losses.device)[labels[anchors]]
        total = weights.sum()
        return (losses * weights).sum() / total if total > 0 else self.zero_loss(embeddings)

    def element_reduction(self, losses, loss_indices, embeddings, labels):
        return self._weighted_mean(losses, loss_indices, embeddings, labels)

    def pos_pair_reduction(self, losses, loss_indices, embeddings, labels):
        return self._weighted_mean(losses, loss_indices[0], embeddings, labels)

    neg_pair_reduction = pos_pair_reduction

    def triplet_reduction(self, losses, loss_indices, embeddings, labels):
        return self._weighted_mean(losses, loss_indices[0], embeddings, labels)


class PMLLoss(MetricLossBase):
    """A pytorch-metric-learning loss (and optional miner) as a plain ``(emb, labels)`` loss.

    Embeddings are cast to float32 so distances stay exact under bf16/fp16 autocast. A batch
    with no valid pair or triplet gives PML's zero loss, which still carries a gradient.
    """

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None, class_weighted: bool = False):
        super().__init__()
        self.loss = loss
        self.miner = miner
        if class_weighted:
            self.enable_class_weighting()

    def enable_class_weighting(self) -> None:
        """Swap PML's default reducer for :class:`ClassWeightedReducer` (the same mean until
        weights are set); called by the LightningModule when ``model.class_weighting`` is on."""
        loss = self.loss
        if any(isinstance(m, ClassWeightedReducer) for m in loss.modules()):
            return
        default = loss.reducer
        inner = next(iter(default.reducers.values())) if isinstance(default, MultipleReducers) else default
        if type(inner).__name__ not in ("AvgNonZeroReducer", "MeanReducer"):
            raise ValueError(
                f"{type(loss).__name__} reduces per class already ({type(inner).__name__}); class "
                "weighting (model.class_weighting) works with pair-, triplet- and sample-based losses"
            )
        loss.set_reducer(ClassWeightedReducer(nonzero_only=isinstance(inner, AvgNonZeroReducer)))

    def set_class_weights(self, weights: Tensor | None) -> None:
        reducers = [m for m in self.loss.modules() if isinstance(m, ClassWeightedReducer)]
        if weights is not None and not reducers:
            raise ValueError("class weights need the loss built with class_weighted=True")
        for reducer in reducers:
            reducer.class_weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        device = embeddings.device.type
        if embeddings.dtype == torch.float32 and not torch.is_autocast_enabled(device):
            return self._compute(embeddings, labels)  # the common case: no context to enter
        with torch.autocast(device_type=device, enabled=False):
            return self._compute(embeddings.float(), labels)

    def _compute(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        tuples = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss(embeddings, labels, tuples)


# --- pair- and tuple-based ------------------------------------------------------------------
# Each class takes (num_classes, embedding_dim) first -- given by the LightningModule at run time,
# ignored by the losses that own no weights -- then its own hyper-parameters, which the CLI sets
# (``--model.metric_loss=SupCon --model.metric_loss.temperature=0.05``).
class SupCon(PMLLoss):
    """Supervised contrastive loss (Khosla et al., NeurIPS 2020).

    Args:
        num_classes: unused (given by the LightningModule).
        embedding_dim: unused (given by the LightningModule).
        temperature: softmax temperature of the similarities.
        class_weighted: weight each anchor by its class (the module sets it from model.class_weighting).
    """

    short_name = "supcon"

    def __init__(self, num_classes: int | None = None, embedding_dim: int | None = None, temperature: float = 0.1, class_weighted: bool = False):
        super().__init__(losses.SupConLoss(temperature=temperature), class_weighted=class_weighted)


class Triplet(PMLLoss):
    """Triplet margin loss (Schroff et al., CVPR 2015) with a miner.

    Args:
        num_classes: unused (given by the LightningModule).
        embedding_dim: unused (given by the LightningModule).
        margin: triplet margin.
        mining: ``batch_hard`` (Hermans et al. 2017), ``semi_hard`` or ``all``.
        class_weighted: weight each anchor by its class (the module sets it from model.class_weighting).
    """

    short_name = "triplet"

    def __init__(self, num_classes: int | None = None, embedding_dim: int | None = None, margin: float = 0.2, mining: str = "batch_hard", class_weighted: bool = False):
        miner_by_name = {
            "batch_hard": miners.BatchHardMiner,
            "semi_hard": lambda: miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard"),
            "all": lambda: None,
        }
        if mining not in miner_by_name:
            raise ValueError(f"unknown triplet mining {mining!r} (model.metric_loss_kwargs.mining or model.metric_loss.mining); valid: {sorted(miner_by_name)}")
        super().__init__(losses.TripletMarginLoss(margin=margin), miner_by_name[mining](), class_weighted)


class Contrastive(PMLLoss):
    """Contrastive loss (Hadsell et al., CVPR 2006) on normalised Euclidean distances.

    Args:
        num_classes: unused (given by the LightningModule).
        embedding_dim: unused (given by the LightningModule).
        pos_margin: positive pairs are pulled in below this distance.
        neg_margin: negative pairs are pushed out beyond this distance.
        class_weighted: weight each anchor by its class (the module sets it from model.class_weighting).
    """

    short_name = "contrastive"

    def __init__(self, num_classes: int | None = None, embedding_dim: int | None = None, pos_margin: float = 0.0, neg_margin: float = 1.0, class_weighted: bool = False):
        loss = losses.ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin, distance=LpDistance(normalize_embeddings=True))
        super().__init__(loss, class_weighted=class_weighted)


class MultiSimilarity(PMLLoss):
    """Multi-similarity loss with its pair miner (Wang et al., CVPR 2019).

    Args:
        num_classes: unused (given by the LightningModule).
        embedding_dim: unused (given by the LightningModule).
        alpha: weight of positive pairs.
        beta: weight of negative pairs.
        base: similarity offset.
        miner_epsilon: the pair miner's margin; None: no miner.
        class_weighted: weight each anchor by its class (the module sets it from model.class_weighting).
    """

    short_name = "multi_similarity"

    def __init__(
        self, num_classes: int | None = None, embedding_dim: int | None = None, alpha: float = 2.0, beta: float = 50.0,
        base: float = 0.5, miner_epsilon: float | None = 0.1, class_weighted: bool = False,
    ):
        miner = miners.MultiSimilarityMiner(epsilon=miner_epsilon) if miner_epsilon is not None else None
        super().__init__(losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base), miner, class_weighted)


class Circle(PMLLoss):
    """Circle loss (Sun et al., CVPR 2020).

    Args:
        num_classes: unused (given by the LightningModule).
        embedding_dim: unused (given by the LightningModule).
        m: relaxation margin.
        gamma: scale factor.
        class_weighted: weight each anchor by its class (the module sets it from model.class_weighting).
    """

    short_name = "circle"

    def __init__(self, num_classes: int | None = None, embedding_dim: int | None = None, m: float = 0.4, gamma: float = 80.0, class_weighted: bool = False):
        super().__init__(losses.CircleLoss(m=m, gamma=gamma), class_weighted=class_weighted)


class NTXent(PMLLoss):
    """NT-Xent with label-defined positives (Chen et al., SimCLR, ICML 2020).

    PML masks a (positive pairs x negative pairs) matrix: fine for SimCLR-style batches (one
    positive per anchor), but with few classes it grows as B^4 (~5e8 entries at B=256 with 7
    classes). Prefer supcon for class labels.

    Args:
        num_classes: unused (given by the LightningModule).
        embedding_dim: unused (given by the LightningModule).
        temperature: softmax temperature.
        class_weighted: weight each anchor by its class (the module sets it from model.class_weighting).
    """

    short_name = "ntxent"

    def __init__(self, num_classes: int | None = None, embedding_dim: int | None = None, temperature: float = 0.07, class_weighted: bool = False):
        super().__init__(losses.NTXentLoss(temperature=temperature), class_weighted=class_weighted)


# --- proxy and classifier-style: own weights --------------------------------------------------
class ProxyAnchor(PMLLoss):
    """Proxy-Anchor loss (Kim et al., CVPR 2020); one learnable proxy per class.

    Args:
        num_classes: number of proxies (given by the LightningModule).
        embedding_dim: their dimension (given by the LightningModule).
        margin: proxy margin.
        alpha: scale.
        class_weighted: weight each anchor by its class (the module sets it from model.class_weighting).
    """

    short_name = "proxy_anchor"

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.1, alpha: float = 32.0, class_weighted: bool = False):
        super().__init__(losses.ProxyAnchorLoss(num_classes, embedding_dim, margin=margin, alpha=alpha), class_weighted=class_weighted)


class ProxyNCA(PMLLoss):
    """ProxyNCA (Movshovitz-Attias et al., ICCV 2017).

    Args:
        num_classes: number of proxies (given by the LightningModule).
        embedding_dim: their dimension (given by the LightningModule).
        softmax_scale: scale of the distances in the softmax.
        class_weighted: weight each anchor by its class (the module sets it from model.class_weighting).
    """

    short_name = "proxy_nca"

    def __init__(self, num_classes: int, embedding_dim: int, softmax_scale: float = 1.0, class_weighted: bool = False):
        super().__init__(losses.ProxyNCALoss(num_classes, embedding_dim, softmax_scale=softmax_scale), class_weighted=class_weighted)


class ArcFace(PMLLoss):
    """ArcFace additive angular margin (Deng et al., CVPR 2019).

    Args:
        num_classes: number of class weight vectors (given by the LightningModule).
        embedding_dim: their dimension (given by the LightningModule).
        margin: angular margin in degrees, as in PML.
        scale: logit scale.
        class_weighted: weight each anchor by its class (the module sets it from model.class_weighting).
    """

    short_name = "arcface"

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 28.6, scale: float = 64.0, class_weighted: bool = False):
        super().__init__(losses.ArcFaceLoss(num_classes, embedding_dim, margin=margin, scale=scale), class_weighted=class_weighted)


class CosFace(PMLLoss):
    """CosFace large-margin cosine loss (Wang et al., CVPR 2018).

    Args:
        num_classes: number of class weight vectors (given by the LightningModule).
        embedding_dim: their dimension (given by the LightningModule).
        margin: cosine margin.
        scale: logit scale.
        class_weighted: weight each anchor by its class (the module sets it from model.class_weighting).
    """

    short_name = "cosface"

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.35, scale: float = 64.0, class_weighted: bool = False):
        super().__init__(losses.CosFaceLoss(num_classes, embedding_dim, margin=margin, scale=scale), class_weighted=class_weighted)


class SoftTriple(PMLLoss):
    """SoftTriple loss (Qian et al., ICCV 2019): several learnable centres per class.

    Args:
        num_classes: number of classes (given by the LightningModule).
        embedding_dim: centre dimension (given by the LightningModule).
        centers_per_class: centres per class.
        la: scale of the similarities.
        gamma: scale of the centre softmax.
        margin: margin.
        class_weighted: weight each anchor by its class (the module sets it from model.class_weighting).
    """

    short_name = "soft_triple"

    def __init__(
        self, num_classes: int, embedding_dim: int, centers_per_class: int = 10, la: float = 20.0, gamma: float = 0.1,
        margin: float = 0.01, class_weighted: bool = False,
    ):
        loss = losses.SoftTripleLoss(num_classes, embedding_dim, centers_per_class=centers_per_class, la=la, gamma=gamma, margin=margin)
        super().__init__(loss, class_weighted=class_weighted)


#: the PML losses by short name (all of them are also in METRIC_LOSSES)
PML_LOSSES = {cls.short_name: cls for cls in (SupCon, Triplet, Contrastive, MultiSimilarity, Circle, NTXent, ProxyAnchor, ProxyNCA, ArcFace, CosFace, SoftTriple)}
