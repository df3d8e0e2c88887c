"""The optimiser every medmetric module uses: AdamW or SGD, LR scaled to the global batch, and a
per-step cosine decay. A mixin, so single-label and multi-label modules share one definition."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from medmetric.lightning_modules.lr_scaling import global_batch_size, scaled_lr

OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


class OptimizerMixin:
    """``make_optimizer`` for a LightningModule whose hparams may hold ``lr_scaling`` and
    ``base_batch_size`` (absent: no scaling)."""

    def batch_scaled_lr(self, lr: float) -> float:
        """``lr`` scaled to the global batch by ``model.lr_scaling`` (lightning_modules/lr_scaling.py)."""
        rule = self.hparams.get("lr_scaling", "none")
        batch = global_batch_size(self.trainer)
        if rule == "none" or batch is None:
            return scaled_lr(lr, rule, 1, 1)  # validates the rule name
        return scaled_lr(lr, rule, batch, self.hparams.get("base_batch_size", 256))

    def make_optimizer(self, params: Iterable[nn.Parameter] | list[dict], name: str, lr: float, weight_decay: float):
        """Optimiser (over parameters or parameter groups) plus a per-step cosine decay."""
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r} (model.optimizer); valid: {sorted(OPTIMIZERS)}")
        extra = {"momentum": 0.9} if name == "sgd" else {}
        factor = self.batch_scaled_lr(1.0)  # the rules are linear in lr; groups with their own lr scale too
        params = [{**g, "lr": g["lr"] * factor} if isinstance(g, dict) and "lr" in g else g for g in params]
        optimizer = OPTIMIZERS[name](params, lr=lr * factor, weight_decay=weight_decay, **extra)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
