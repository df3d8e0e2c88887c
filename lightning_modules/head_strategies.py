"""Stage-2 classifier strategies on frozen stage-1 features (Kang et al., ICLR 2020, and successors).

Each strategy maps backbone features (N, F) to logits (N, C). ``trainable`` ones are optimised
by the head loss on (class-balanced) batches; post-hoc ones are fitted once on the training
features (:meth:`fit`) and, for tau-norm, tuned on validation (:meth:`select_on_validation`).

- ``crt``: a freshly initialised linear head (classifier re-training).
- ``lws``: the stage-1 linear head, frozen, times one learnable scale per class (learnable
  weight scaling): f_j(x) = s_j (w_j . x + b_j).
- ``tau_norm``: the stage-1 weights normalised, w_j / ||w_j||^tau, no bias; tau picked from a
  grid by validation balanced accuracy (never on test).
- ``ncm``: nearest class mean: cosine similarity of the L2-normalised feature to each class's
  mean L2-normalised training feature.
- ``knn``: k nearest training neighbours in the stage-1 embedding (projector output), votes
  weighted by exp(cosine / temperature); logits are log vote shares.

``RebalancedHeadModule`` types ``strategy`` as ``Callable[[int, int, LinearHead], HeadStrategy]``:
jsonargparse builds a strategy's own arguments (``--model.strategy.k=20``), the module supplies
the feature dimension, the class count and the stage-1 head (and the stage-1 projector, as
``projector=``, to a class with ``uses_projector = True``). A subclass that sets ``short_name``
registers itself in :data:`STRATEGIES` when defined; modules of this package named
``head_strategy_*.py`` are imported before a short-name lookup, so a new strategy is one file.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmetric.lightning_modules.heads import LinearHead, Projector
from medmetric.lightning_modules.metrics.classification import balanced_accuracy_from_confusion
from medmetric.lightning_modules.registry import Registry

#: stage-2 strategies by short name; each class registers itself (``short_name``)
STRATEGIES = Registry("stage-2 strategy", "model.strategy", scan=(("medmetric.lightning_modules", "head_strategy_"),))


def balanced_accuracy(logits: Tensor, targets: Tensor, num_classes: int) -> float:
    """Balanced accuracy of argmax predictions, by the metrics module's definition."""
    pairs = targets.long() * num_classes + logits.argmax(1)
    confusion = torch.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    return balanced_accuracy_from_confusion(confusion)


class HeadStrategy(nn.Module):
    """Base of the stage-2 strategies: ``forward(features (N, F)) -> logits (N, C)``."""

    short_name: ClassVar[str | None] = None
    uses_projector: ClassVar[bool] = False  # the module passes the stage-1 projector as projector=
    trainable = True  # optimised by the head loss; otherwise fitted once by fit()
    tunes_on_validation = False  # select_on_validation() picks a hyperparameter on val features

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("short_name"):
            STRATEGIES.add(cls.short_name, cls)

    def fit(self, features: Tensor, targets: Tensor) -> None:
        """Post-hoc strategies compute their classifier from all training features here."""

    def select_on_validation(self, features: Tensor, targets: Tensor) -> dict[str, float]:
        """Strategies with a hyperparameter tuned on validation choose it here."""
        return {}


class ClassifierRetraining(HeadStrategy):
    """cRT: a freshly initialised linear head trained on re-balanced batches.

    Args:
        feature_dim: backbone feature dimension (given by the module).
        num_classes: number of classes (given by the module).
        stage1_head: the stage-1 head (given by the module; unused).
    """

    short_name = "crt"
    def __init__(self, feature_dim: int, num_classes: int, stage1_head: LinearHead):
        super().__init__()
        self.head = LinearHead(feature_dim, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.head(features)


class LearnableWeightScaling(HeadStrategy):
    """LWS: the frozen stage-1 head times one learnable scale per class.

    Args:
        feature_dim: backbone feature dimension (given by the module).
        num_classes: number of classes (given by the module).
        stage1_head: the stage-1 head (given by the module), frozen.
    """

    short_name = "lws"
    def __init__(self, feature_dim: int, num_classes: int, stage1_head: LinearHead):
        super().__init__()
        self.stage1_head = stage1_head.requires_grad_(False)
        self.scales = nn.Parameter(torch.ones(num_classes))

    def forward(self, features: Tensor) -> Tensor:
        return self.stage1_head(features) * self.scales


class TauNormalisedClassifier(HeadStrategy):
    """tau-norm: stage-1 weights over their norm to the power tau, tau picked on validation.

    Args:
        feature_dim: backbone feature dimension (given by the module).
        num_classes: number of classes (given by the module).
        stage1_head: the stage-1 head (given by the module).
        tau_grid: the tau values tried on validation (default 0, 0.1, ..., 2).
    """

    short_name = "tau_norm"
    trainable = False
    tunes_on_validation = True

    def __init__(self, feature_dim: int, num_classes: int, stage1_head: LinearHead, tau_grid: list[float] | None = None):
        super().__init__()
        self.register_buffer("weight", stage1_head.weight.detach().clone())
        self.register_buffer("tau", torch.tensor(1.0))
        self.tau_grid = list(tau_grid) if tau_grid is not None else [round(0.1 * i, 1) for i in range(21)]

    def logits_for(self, features: Tensor, tau: float) -> Tensor:
        norms = self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return features @ (self.weight / norms**tau).T

    def forward(self, features: Tensor) -> Tensor:
        return self.logits_for(features, float(self.tau))

    def select_on_validation(self, features: Tensor, targets: Tensor) -> dict[str, float]:
        scores = {tau: balanced_accuracy(self.logits_for(features, tau), targets, self.weight.shape[0]) for tau in self.tau_grid}
        best = max(scores, key=lambda tau: (scores[tau], -abs(tau - 1.0)))  # ties: closest to plain normalisation
        self.tau.fill_(best)
        return {"tau": best, "tau_val_balanced_accuracy": scores[best]}


class NearestClassMean(HeadStrategy):
    """NCM: cosine similarity to each class's mean normalised training feature.

    Args:
        feature_dim: backbone feature dimension (given by the module).
        num_classes: number of classes (given by the module).
        stage1_head: the stage-1 head (given by the module; unused).
    """

    short_name = "ncm"
    trainable = False

    def __init__(self, feature_dim: int, num_classes: int, stage1_head: LinearHead):
        super().__init__()
        self.register_buffer("means", torch.zeros(num_classes, feature_dim))

    def fit(self, features: Tensor, targets: Tensor) -> None:
        normalised = F.normalize(features.float(), dim=1)
        sums = torch.zeros_like(self.means).index_add(0, targets, normalised)
        counts = torch.bincount(targets, minlength=self.means.shape[0]).clamp_min(1)
        self.means.copy_(F.normalize(sums / counts[:, None], dim=1))

    def forward(self, features: Tensor) -> Tensor:
        return F.normalize(features.float(), dim=1) @ self.means.T


class NearestNeighbours(HeadStrategy):
    """kNN in the stage-1 embedding, votes weighted by exp(cosine / temperature).

    Args:
        feature_dim: backbone feature dimension (given by the module).
        num_classes: number of classes (given by the module).
        stage1_head: the stage-1 head (given by the module; unused).
        projector: the stage-1 projector (given by the module: ``uses_projector``).
        k: number of neighbours.
        temperature: vote temperature.
        chunk_size: queries per similarity block (memory bound).
    """

    short_name = "knn"
    uses_projector = True
    trainable = False

    def __init__(self, feature_dim: int, num_classes: int, stage1_head: LinearHead, projector: Projector | None = None, k: int = 10, temperature: float = 0.1, chunk_size: int = 1024):
        super().__init__()
        if projector is None:
            raise ValueError("the kNN strategy needs the stage-1 projector (RebalancedHeadModule passes it)")
        self.projector = projector.requires_grad_(False)
        self.num_classes, self.k, self.temperature, self.chunk_size = num_classes, k, temperature, chunk_size
        self.register_buffer("bank", torch.zeros(0, projector.net[-1].out_features), persistent=True)
        self.register_buffer("bank_labels", torch.zeros(0, dtype=torch.long), persistent=True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """The bank's size is known only after fit: take it from the checkpoint."""
        for name in ("bank", "bank_labels"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def fit(self, features: Tensor, targets: Tensor) -> None:
        with torch.no_grad():
            self.bank = self.projector(features.float())
        self.bank_labels = targets.clone()

    def forward(self, features: Tensor) -> Tensor:
        if self.bank.shape[0] == 0:
            raise RuntimeError("kNN head has no training bank: fit() it on the training features first")
        query = self.projector(features.float())
        k = min(self.k, self.bank.shape[0])
        votes = []
        for chunk in query.split(self.chunk_size):
            sims, idx = (chunk @ self.bank.T).topk(k, dim=1)
            weights = torch.exp(sims / self.temperature)
            votes.append(torch.zeros(len(chunk), self.num_classes, device=chunk.device).scatter_add(1, self.bank_labels[idx], weights))
        votes = torch.cat(votes)
        return torch.log(votes / votes.sum(1, keepdim=True) + 1e-8)

