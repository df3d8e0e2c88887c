"""Global batch size -> per-device batch size (the batch one optimiser step sees is global).

Under DDP every process loads its own batch, so the optimiser step averages
``per_device x devices x num_nodes x accumulate_grad_batches`` images. Users think in that
global number (and learning rates are tuned for it), so ``data.global_batch_size`` fixes it and
the per-device batch follows from the world the Trainer runs in.
"""

from __future__ import annotations


def per_device_batch_size(global_batch_size: int, world_size: int, accumulate_grad_batches: int = 1) -> int:
    """``global / (world_size x accumulate)``, or a clear error when it does not divide."""
    if global_batch_size < 1:
        raise ValueError(f"data.global_batch_size must be >= 1, got {global_batch_size}")
    shards = world_size * accumulate_grad_batches
    if global_batch_size % shards:
        lower = max(shards, global_batch_size // shards * shards)
        raise ValueError(
            f"data.global_batch_size={global_batch_size} is not divisible by devices x num_nodes x "
            f"accumulate_grad_batches = {world_size} x {accumulate_grad_batches} = {shards}; use a multiple "
            f"of {shards} such as {lower} or {lower + shards}, or change trainer.devices/num_nodes"
        )
    return global_batch_size // shards
