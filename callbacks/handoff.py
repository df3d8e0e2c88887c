"""Stage 1 -> stage 2 handoff: a JSON manifest naming the best backbone and what it was trained on.

Stage 1 (this callback, at the end of fit, rank zero) takes the checkpoint chosen on validation
balanced accuracy, saves its backbone weights alone to ``backbone.pt``, and writes
``handoff.json`` in the run folder and at ``runs/<experiment>/handoff.json`` (the latest stage 1
of that experiment). Stage 2 reads the manifest with :func:`read_manifest` and refuses one whose
backbone, class list or split differs from its own (:func:`check_manifest`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from callbacks.atomic_checkpoint import atomic_write, load_checkpoint_safely

MANIFEST_FORMAT = "medmetric-handoff/1"
PATH_KEYS = ("checkpoint", "backbone_weights", "head_weights", "projector_weights", "split_file", "stage1_run_dir")


class HandoffError(ValueError):
    """A manifest is missing, malformed, or does not match the stage-2 run."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write to a temporary file, fsync and rename: a crash or a full disk never leaves a
    half-written JSON, and the previous version stays intact (callbacks/atomic_checkpoint.py)."""
    text = (json.dumps(payload, indent=2, default=float) + "\n").encode()
    atomic_write(path, lambda handle: handle.write(text), what=f"JSON file ({path.name})")


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest``, storing its file paths relative to ``path``'s folder (runs can move)."""
    stored = dict(manifest)
    for key in PATH_KEYS:
        if stored.get(key):
            stored[key] = os.path.relpath(Path(stored[key]).resolve(), path.parent.resolve())
    write_json_atomic(path, stored)


def read_manifest(path: str | Path, experiment: str | None = None) -> dict[str, Any]:
    """Load a manifest, resolving its paths; errors say which stage-1 command to run."""
    path = Path(path)
    if not path.is_file():
        name = experiment or path.parent.name
        raise HandoffError(
            f"no stage-1 handoff manifest at {path}. Run stage 1 first: "
            f"`make train-stage1 DATA=<data> EXPERIMENT={name}` (or `python -m experiments fit "
            f"--config experiments/<data>/stage1.yaml --experiment={name}`), or point "
            "--model.handoff at an existing handoff.json"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise HandoffError(f"{path} is not valid JSON ({err}); re-run stage 1 to rewrite it") from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise HandoffError(f"{path} is not a medmetric handoff manifest (format {MANIFEST_FORMAT!r})")
    for key in PATH_KEYS:
        if manifest.get(key):
            manifest[key] = str((path.parent / manifest[key]).resolve())
    weights = Path(manifest["backbone_weights"])
    if not weights.is_file():
        raise HandoffError(f"{path}: its backbone weights {weights} are missing; re-run stage 1")
    if file_sha256(weights) != manifest["backbone_weights_sha256"]:
        raise HandoffError(f"{path}: {weights} changed since the manifest was written; re-run stage 1")
    manifest["path"] = str(path)
    return manifest


def check_manifest(
    manifest: dict[str, Any],
    class_names: list[str] | None = None,
    backbone: str | None = None,
    split_sha256: str | None = None,
    fingerprint: str | None = None,
    allow_fingerprint_mismatch: bool = False,
) -> None:
    """Refuse to continue from a stage 1 trained on other classes, another backbone, split or data."""
    where = manifest.get("path", "handoff manifest")
    if class_names is not None and list(class_names) != list(manifest["class_names"]):
        raise HandoffError(
            f"{where}: stage 1 was trained on classes {manifest['class_names']} but this run has "
            f"{list(class_names)}. Use the same data set, or re-run stage 1 on this one"
        )
    if backbone is not None and backbone != manifest["backbone"]["name"]:
        raise HandoffError(
            f"{where}: stage 1 backbone is {manifest['backbone']['name']!r} but model.backbone="
            f"{backbone!r}. Drop model.backbone (stage 2 takes it from the manifest) or re-run stage 1"
        )
    if split_sha256 is not None and split_sha256 != manifest["split_sha256"]:
        raise HandoffError(
            f"{where}: the data split differs from stage 1's ({manifest.get('split_file') or 'kept in memory'}); "
            "stage 2 would train or test on images stage 1 saw in another split. "
            + (f"Use --data.split_file={manifest['split_file']}" if manifest.get("split_file")
               else "Re-run stage 1 with a saved split (the CLI saves one per experiment)")
        )
    stored = manifest.get("dataset_fingerprint")
    if fingerprint is not None and stored is not None and fingerprint != stored and not allow_fingerprint_mismatch:
        raise HandoffError(
            f"{where}: the data set changed since stage 1 (dataset fingerprint {stored[:12]} in the manifest, "
            f"{fingerprint[:12]} now: files added/removed/resized, labels or groups edited, data at "
            f"{manifest.get('data_dir')}). Re-run stage 1 on this data, or pass "
            "--model.allow_fingerprint_mismatch=true to accept it knowingly"
        )


def save_submodule_state(state: dict, prefix: str, run_dir: Path) -> Path:
    """Save the ``<prefix>.*`` entries of a module state dict alone, as ``<run>/<prefix>.pt``."""
    sub = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    return atomic_write(run_dir / f"{prefix}.pt", lambda handle: torch.save(sub, handle), what=f"{prefix} weights")


def load_submodule_state(module: torch.nn.Module, path: str | Path) -> None:
    """Load weights saved by :func:`save_submodule_state`, safely (weights_only)."""
    module.load_state_dict(load_checkpoint_safely(path, what="handoff weights"))


def stage1_manifest(folder: Path, stage1, state: dict, class_counts, split_sha256: str) -> dict[str, Any]:
    """Save a stage-1 model's backbone, head and projector weights to ``folder`` and return the
    manifest fields stage 2 needs (the callback adds where they came from)."""
    present = [p for p in ("backbone", "head", "projector") if isinstance(getattr(stage1, p, None), torch.nn.Module)]
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
        datamodule = trainer.datamodule
        score = getattr(checkpoint_cb, "best_model_score", None)
        manifest = stage1_manifest(run_dir, pl_module, state, datamodule.class_counts, datamodule.split_sha256())
        manifest.update({
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "stage1_run_dir": str(run_dir),
            "checkpoint": best or None,
            "split_file": str(datamodule.split_file) if datamodule.split_file else None,
            "datamodule": type(datamodule).__name__,
            "dataset_fingerprint": datamodule.fingerprint() if hasattr(datamodule, "fingerprint") else None,
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
