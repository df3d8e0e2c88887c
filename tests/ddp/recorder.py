"""A callback for DDP tests: each rank writes what it trained on and what it read.

Per rank: the class ids of every training batch, the type of its training dataset (images, or
feature vectors from the stage-2 feature cache) with a checksum of those features, and the
stage-1 manifest its model loaded (stage 2).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class BatchRecorder(Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.batches: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch[1].tolist())

    def on_fit_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        train = trainer.datamodule.datasets["train"]
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "batches": self.batches,
            "train_dataset": type(train).__name__,
            "features_sha256": hashlib.sha256(train.features.numpy().tobytes()).hexdigest() if hasattr(train, "features") else None,
            "manifest_weights_sha256": getattr(pl_module, "manifest", {}).get("backbone_weights_sha256"),
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
