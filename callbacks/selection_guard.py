"""Model selection on validation only: refuse any callback that monitors a test metric.

Picking a checkpoint (ModelCheckpoint), stopping (EarlyStopping) or tuning anything on a
``test/`` metric makes the test score optimistic. The default monitor is
``val/balanced_accuracy``; tau-norm picks tau inside ``on_validation_epoch_end`` on validation
features only. Test metrics are computed once per run by ``after_fit`` on the checkpoint chosen
on validation; a second ``test`` in the same run folder is written apart as
``results.<n>.json`` with ``"retest": true`` and ``medmetric report`` reads ``results.json`` only.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback


class SelectionOnTestError(ValueError):
    """Something would select a model or a hyperparameter on the test split."""


def check_monitors(callbacks) -> None:
    for callback in callbacks:
        monitor = getattr(callback, "monitor", None)
        if isinstance(monitor, str) and monitor.lower().startswith(("test/", "test_")):
            raise SelectionOnTestError(
                f"{type(callback).__name__}(monitor={monitor!r}) would select on the test split, which makes the "
                "test score optimistic. Monitor a validation metric instead (e.g. monitor: val/balanced_accuracy, "
                "the default)"
            )


class ValidationOnlySelection(Callback):
    """Checks every callback's ``monitor`` when fitting starts."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_monitors(trainer.callbacks)
