"""pytorch-metric-learning losses behind one call signature, computed in float32."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pytorch_metric_learning import losses, miners
from torch import Tensor, nn


class PMLLoss(nn.Module):
    """A pytorch-metric-learning loss, optionally with a miner, as a plain ``(emb, labels)`` loss.

    Embeddings are cast to float32 so distances stay exact under bf16/fp16 autocast. A batch
    with no valid pair or triplet gives PML's zero loss, which still carries a gradient.
    """

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None):
        super().__init__()
        self.loss = loss
        self.miner = miner

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            embeddings = embeddings.float()
            tuples = self.miner(embeddings, labels) if self.miner is not None else None
            return self.loss(embeddings, labels, tuples)


def supcon(temperature: float = 0.1) -> PMLLoss:
    """Supervised contrastive loss (Khosla et al. 2020)."""
    return PMLLoss(losses.SupConLoss(temperature=temperature))


def triplet(margin: float = 0.2, mining: str = "batch_hard") -> PMLLoss:
    """Triplet margin loss; ``mining``: batch_hard (Hermans et al. 2017), semi_hard or all."""
    miner_by_name: dict[str, Callable[[], nn.Module | None]] = {
        "batch_hard": miners.BatchHardMiner,
        "semi_hard": lambda: miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard"),
        "all": lambda: None,
    }
    if mining not in miner_by_name:
        raise ValueError(f"unknown triplet mining {mining!r} (model.metric_loss_kwargs.mining); valid: {sorted(miner_by_name)}")
    return PMLLoss(losses.TripletMarginLoss(margin=margin), miner_by_name[mining]())


METRIC_LOSSES: dict[str, Callable[..., nn.Module]] = {
    "supcon": supcon,
    "triplet": triplet,
}


def build_metric_loss(name: str, **kwargs) -> nn.Module:
    if name not in METRIC_LOSSES:
        raise ValueError(f"unknown metric loss {name!r} (model.metric_loss); valid: {sorted(METRIC_LOSSES)}")
    try:
        return METRIC_LOSSES[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for metric loss {name!r} (model.metric_loss_kwargs): {err}") from err
