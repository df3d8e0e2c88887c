"""Gather embeddings from every DDP rank so a metric loss sees the whole global batch.

Pair- and proxy-based losses see more positives and negatives when every rank contributes its
embeddings. Only the local slice keeps its autograd graph; its gradient is multiplied by the
world size, because DDP averages gradients over ranks: the average of ``W * dL/d(local)`` over
the ranks is then exactly the single-process gradient of the loss on the concatenated batch,
and parameters owned by the loss (proxies, centres), which every rank differentiates through
the whole gathered batch, get the plain ``dL/dw`` after averaging.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; gradient multiplied by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def world() -> tuple[int, int]:
    """(world size, rank); (1, 0) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_across_ranks(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks in rank order; the local part keeps a scaled gradient.

    Ranks may hold different numbers of rows (padded for the collective, trimmed after).
    """
    size, rank = world()
    if size == 1:
        return x
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))
    counts = [int(c) for c in counts]
    longest = max(counts)
    padded = x.detach()
    if x.shape[0] < longest:
        padded = torch.cat([padded, padded.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    parts = [part[:count] for part, count in zip(parts, counts, strict=True)]
    parts[rank] = _ScaleGrad.apply(x, float(size)) if x.requires_grad else x
    return torch.cat(parts)
