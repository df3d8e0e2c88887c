"""Learning-rate scaling with the global batch size.

``model.lr`` is the rate for ``model.base_batch_size`` images per optimiser step. With a larger
global batch (more GPUs, more nodes, gradient accumulation) the effective rate is

* ``linear``: ``lr x B / B_base`` (Goyal et al. 2017, "Accurate, Large Minibatch SGD": keep
  the update per image constant; pair it with warm-up for very large B),
* ``sqrt``: ``lr x sqrt(B / B_base)`` (keeps the gradient-noise scale; common for Adam-type
  optimisers, Krizhevsky 2014 / Hoffer et al. 2017),
* ``none``: ``lr`` unchanged (the default: configs are tuned at their own batch).
"""

from __future__ import annotations

import math

from medmetric.datamodules.contracts import BatchSizeData, require

LR_SCALING_RULES = ("none", "linear", "sqrt")


def scaled_lr(lr: float, rule: str, global_batch_size: int, base_batch_size: int) -> float:
    if rule not in LR_SCALING_RULES:
        raise ValueError(f"unknown model.lr_scaling {rule!r}; valid: {list(LR_SCALING_RULES)}")
    if base_batch_size < 1:
        raise ValueError(f"model.base_batch_size must be >= 1, got {base_batch_size}")
    ratio = global_batch_size / base_batch_size
    return lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


def global_batch_size(trainer) -> int | None:
    """Images per optimiser step: per-device batch x world size x gradient accumulation.

    None without a DataModule (plain dataloaders: no batch size is declared, so no scaling);
    a DataModule without ``batch_size`` is refused rather than left unscaled."""
    if trainer.datamodule is None:
        return None
    batch = require(trainer.datamodule, BatchSizeData, "model.lr_scaling (the global batch size)").batch_size
    return int(batch) * trainer.world_size * trainer.accumulate_grad_batches
