"""The optimiser every medmetric module uses: AdamW or SGD (or any ``torch.optim`` class), LR
scaled to the global batch, and a per-step schedule: linear warm-up, then cosine decay.

``optimizer`` and ``lr_scheduler`` are typed like LightningCLI's own ``OptimizerCallable`` /
``LRSchedulerCallable``: jsonargparse builds the class and its own arguments from the config
(``--model.optimizer=SGD --model.optimizer.nesterov=true``) and the module calls it with what
is known only at run time (the parameter groups; the optimiser). The short names keep the
configs and sweeps of before working and reproduce exactly what they built:

* ``adamw``: ``AdamW(params, lr, weight_decay)``; ``sgd``: ``SGD(params, lr, weight_decay,
  momentum=0.9)``. ``model.lr`` and ``model.weight_decay`` are always passed (they override a
  class form's own ``lr``/``weight_decay``), so sweeps keep one spelling for them.
* ``cosine``: per step, ``CosineAnnealingLR(T_max=estimated_stepping_batches)`` when
  ``warmup_steps=0`` (bit-identical to before); with ``warmup_steps=W`` the factor of the base
  rate at step s is ``(s + 1) / W`` for ``s < W``, then ``0.5 (1 + cos(pi (s - W) / (T - W)))``
  (Goyal et al. 2017 pair linear scaling with exactly this warm-up); ``constant``: no decay.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from medmetric.lightning_modules.lr_scaling import global_batch_size, scaled_lr

OptimizerFactory = Callable[[Iterable], Optimizer]
SchedulerFactory = Callable[[Optimizer], LRScheduler]

OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "sgd": functools.partial(torch.optim.SGD, momentum=0.9),
}
SCHEDULES = ("cosine", "constant")


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """The LR factor at optimiser step ``step`` (0-based) of ``total_steps``: see the module docstring."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


def check_optimization_args(optimizer, lr_scheduler, warmup_steps: int) -> None:
    """Fail at construction, naming the key, rather than when training starts."""
    for key, spec, valid in (("model.optimizer", optimizer, OPTIMIZERS), ("model.lr_scheduler", lr_scheduler, SCHEDULES)):
        if isinstance(spec, str) and spec not in valid:
            hint = f"a class path is written --{key}.class_path={spec}" if "." in spec else (
                f"or a class: --{key}=<ClassName> / --{key}.class_path=<module.Class>")
            raise ValueError(f"unknown {key} {spec!r}; valid short names: {sorted(valid)}; {hint}")
        if not isinstance(spec, str) and not callable(spec):
            raise ValueError(f"{key} must be a short name or a class, got {spec!r}")
    if warmup_steps < 0:
        raise ValueError(f"model.warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps and not isinstance(lr_scheduler, str):
        raise ValueError(
            "model.warmup_steps works with the built-in schedules (model.lr_scheduler=cosine or constant); "
            "with a scheduler class set its own warm-up arguments, or use --model.warmup_steps=0"
        )


def build_optimizer(spec: str | Callable, params, lr: float, weight_decay: float) -> Optimizer:
    """The optimiser of a short name or a class (names were checked by :func:`check_optimization_args`)."""
    factory = OPTIMIZERS[spec] if isinstance(spec, str) else spec
    return factory(params, lr=lr, weight_decay=weight_decay)


def build_scheduler(spec: str | Callable, optimizer: Optimizer, total_steps: int, warmup_steps: int) -> LRScheduler:
    """The per-step schedule (arguments checked by :func:`check_optimization_args`)."""
    if not isinstance(spec, str):
        return spec(optimizer)
    if spec == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))
    if not warmup_steps:  # exactly the schedule of before
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, total_steps, warmup_steps))


class OptimizerMixin:
    """``make_optimizer`` for a LightningModule whose hparams may hold ``lr_scaling``,
    ``base_batch_size`` and ``warmup_steps`` (absent: no scaling, no warm-up). A module stores
    its checked ``lr_scheduler`` argument as ``self._lr_scheduler`` (hparams hold only its
    config form when the CLI built it)."""

    _lr_scheduler: str | Callable = "cosine"

    def batch_scaled_lr(self, lr: float) -> float:
        """``lr`` scaled to the global batch by ``model.lr_scaling`` (lightning_modules/lr_scaling.py)."""
        rule = self.hparams.get("lr_scaling", "none")
        if rule == "none":  # no scaling needs no batch size: a DataModule without one is fine here
            return scaled_lr(lr, rule, 1, 1)
        batch = global_batch_size(self.trainer)
        if batch is None:
            return scaled_lr(lr, rule, 1, 1)  # validates the rule name
        return scaled_lr(lr, rule, batch, self.hparams.get("base_batch_size", 256))

    def make_optimizer(self, params: Iterable[nn.Parameter] | list[dict], name: str | Callable, lr: float, weight_decay: float):
        """Optimiser (over parameters or parameter groups) plus the per-step schedule."""
        factor = self.batch_scaled_lr(1.0)  # the rules are linear in lr; groups with their own lr scale too
        params = [{**g, "lr": g["lr"] * factor} if isinstance(g, dict) and "lr" in g else g for g in params]
        optimizer = build_optimizer(name, params, lr * factor, weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = build_scheduler(self._lr_scheduler, optimizer, total, int(self.hparams.get("warmup_steps", 0)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
