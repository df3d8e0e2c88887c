"""Write test results to ``<run>/results.json`` and per-image outputs to ``test_outputs.npz``.

results.json holds the metrics the demo table and the report read; test_outputs.npz holds the
test probabilities, targets and embeddings the report's reliability diagram and embedding
projection need.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from medmetric.datamodules.contracts import (
    SkippedImagesCount,
    SplitIdentity,
    TrainingCounts,
    require,
)
from medmetric.lightning_modules.contracts import TestResultsSource
from medmetric.run_io.atomic import atomic_write, write_json_atomic


def next_free(path: Path) -> Path:
    """``path`` if free, else ``results.1.json``, ``results.2.json``...: never overwrite."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
    return candidate


class ResultsWriter(Callback):
    """After ``trainer.test``, write metrics, class counts and the checkpoint used to JSON.

    The model must provide :class:`~medmetric.lightning_modules.contracts.TestResultsSource`
    and the DataModule ``class_counts``, ``fingerprint()`` and ``skipped_images``: a results.json
    without a fingerprint could not be checked by ``medmetric report``, so it is refused."""

    def __init__(self, experiment: str | None = None, stage: str | None = None):
        self.experiment = experiment
        self.stage = stage
        self.path: Path | None = None

    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        require(pl_module, TestResultsSource, "the results writer (callbacks/results.py)",
                fix="subclass ClassifierModule / MultiLabelClassifierModule or implement the members of "
                    "medmetric.lightning_modules.contracts.TestResultsSource")
        results = pl_module.test_results
        if results is None:
            return  # no test ran in this module (declared: None until on_test_epoch_end)
        reader = "the results writer (results.json: train_class_counts, dataset_fingerprint, skipped_images)"
        datamodule = trainer.datamodule
        for needed in (TrainingCounts, SplitIdentity, SkippedImagesCount):
            require(datamodule, needed, reader)
        payload = {
            "experiment": self.experiment,
            "stage": self.stage,
            "model": type(pl_module).__name__,
            "run_dir": str(Path(trainer.default_root_dir).resolve()),
            "checkpoint": trainer.ckpt_path,
            "class_names": list(pl_module.class_names),
            "train_class_counts": datamodule.class_counts,
            "metrics": results,
            "confusion_matrix": pl_module.test_confusion,
            "dataset_fingerprint": datamodule.fingerprint(),
            "skipped_images": datamodule.skipped_images,
            **pl_module.results_extra,  # multi-label: task, GZSL labels, F1 thresholds
        }
        self.path = next_free(Path(trainer.default_root_dir) / "results.json")
        # test once per run: a re-test is kept apart (results.<n>.json), the report reads results.json only
        payload["retest"] = self.path.name != "results.json"
        write_json_atomic(self.path, payload)
        outputs = pl_module.test_outputs
        if outputs:
            npz = self.path.with_name(self.path.name.replace("results", "test_outputs").replace(".json", ".npz"))
            arrays = {"class_names": np.asarray(pl_module.class_names), **{k: v.numpy() for k, v in outputs.items()}}
            atomic_write(npz, lambda handle: np.savez_compressed(handle, **arrays), what="test outputs")
