"""Stage 1 -> stage 2 handoff: a JSON manifest naming the best backbone and what it was trained on.

Stage 1 (this callback, at the end of fit, rank zero) takes the checkpoint chosen on validation
balanced accuracy, saves its backbone weights alone to ``backbone.pt``, and writes
``handoff.json`` in the run folder and at ``runs/<experiment>/handoff.json`` (the latest stage 1
of that experiment). Stage 2 reads the manifest with :func:`read_manifest` and refuses one whose
backbone, class list or split differs from its own (:func:`check_manifest`).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from medmetric.datamodules.contracts import SplitIdentity, TrainingCounts, has_member, require
from medmetric.lightning_modules.contracts import HANDOFF_OPTIONAL_MODULES, HandoffSource
from medmetric.run_io.manifest import (
    MANIFEST_FORMAT,
    file_sha256,
    save_submodule_state,
    write_manifest,
)


def stage1_manifest(folder: Path, stage1, state: dict, class_counts, split_sha256: str) -> dict[str, Any]:
    """Save a stage-1 model's backbone, head and projector weights to ``folder`` and return the
    manifest fields stage 2 needs (the callback adds where they came from).

    ``stage1`` must provide :class:`~medmetric.lightning_modules.contracts.HandoffSource`;
    ``head`` and ``projector`` are saved when the model has them (optional by design)."""
    require(stage1, HandoffSource, "the stage-1 handoff (callbacks/handoff.py)",
            fix="subclass MetricPretrainModule / MultiLabelPretrainModule or implement the members of "
                "medmetric.lightning_modules.contracts.HandoffSource")
    optional = [p for p in HANDOFF_OPTIONAL_MODULES if has_member(stage1, p)]
    present = ["backbone", *optional]
    for prefix in present:
        if not isinstance(getattr(stage1, prefix), torch.nn.Module):
            raise TypeError(f"{type(stage1).__qualname__}.{prefix} is not a torch.nn.Module; the handoff saves its weights")
    paths = {prefix: save_submodule_state(state, prefix, folder) for prefix in present}  # absent -> None
    return {
        "format": MANIFEST_FORMAT,
        "backbone_weights": str(paths["backbone"]),
        "backbone_weights_sha256": file_sha256(paths["backbone"]),
        "backbone": stage1.backbone_config(),
        "feature_dim": stage1.feature_dim,
        "head_weights": str(paths["head"]) if "head" in paths else None,
        "projector_weights": str(paths["projector"]) if "projector" in paths else None,
        "embedding_dim": stage1.hparams.get("embedding_dim"),
        "class_names": list(stage1.class_names),
        "class_counts": list(class_counts),
        "split_sha256": split_sha256,
    }


class StageHandoff(Callback):
    """At the end of stage 1, publish the best backbone and a manifest for stage 2.

    Args:
        experiment_manifest: where the experiment's "latest stage 1" manifest goes
            (the CLI sets ``runs/<experiment>/handoff.json``); ``None`` writes only the run's own.
    """

    def __init__(self, experiment_manifest: str | None = None):
        self.experiment_manifest = Path(experiment_manifest) if experiment_manifest else None
        self.manifest_path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.interrupted:
            self._publish(trainer, pl_module)
        trainer.strategy.barrier("medmetric-handoff")

    @rank_zero_only
    def _publish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = Path(trainer.default_root_dir)
        checkpoint_cb = trainer.checkpoint_callback
        best = getattr(checkpoint_cb, "best_model_path", "") or ""
        if best:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        else:  # no checkpointing (e.g. fast_dev_run): hand over the weights as they are now
            state = pl_module.state_dict()
        reader = "the stage-1 handoff (StageHandoff: class counts, split hash and fingerprint go to the manifest)"
        datamodule = require(trainer.datamodule, TrainingCounts, reader)
        require(datamodule, SplitIdentity, reader)
        score = getattr(checkpoint_cb, "best_model_score", None)
        manifest = stage1_manifest(run_dir, pl_module, state, datamodule.class_counts, datamodule.split_sha256())
        manifest.update({
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "stage1_run_dir": str(run_dir),
            "checkpoint": best or None,
            "split_file": str(datamodule.split_file) if datamodule.split_file else None,
            "datamodule": type(datamodule).__name__,
            "dataset_fingerprint": datamodule.fingerprint(),
            "data_dir": str(datamodule.data_dir),
            "selected_on": {
                "monitor": getattr(checkpoint_cb, "monitor", None),
                "value": float(score) if score is not None else None,
            },
        })
        self.manifest_path = run_dir / "handoff.json"
        write_manifest(self.manifest_path, manifest)
        if self.experiment_manifest is not None:
            write_manifest(self.experiment_manifest, manifest)
