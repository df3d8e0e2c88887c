"""Classifier heads and the embedding projector that sit on top of backbone features."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class LinearHead(nn.Linear):
    """Plain linear classifier; ``reset`` gives the fresh initialisation cRT calls for."""

    def reset(self) -> None:
        self.reset_parameters()


class Projector(nn.Module):
    """Two-layer MLP to an L2-normalised embedding (SupCon's projection head).

    The metric loss acts on this embedding, not on the features the classifier sees, as in
    Khosla et al. 2020; normalisation puts every embedding on the unit sphere.
    """

    def __init__(self, in_dim: int, out_dim: int = 128, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, features: Tensor) -> Tensor:
        return F.normalize(self.net(features), dim=1)
