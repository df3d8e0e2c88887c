"""The stage-1 -> stage-2 handoff manifest: write, read (with integrity check) and match.

Stage 1 (``medmetric.callbacks.handoff.StageHandoff``) writes ``handoff.json`` next to the
backbone/head/projector weight files; stage 2, ``medmetric index`` and ``medmetric predict``
read it with :func:`read_manifest` (weights hash checked) and refuse one whose backbone, class
list, split or data differ from theirs (:func:`check_manifest`). Here, below the models, so that
models and tools read manifests without importing callbacks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from medmetric.run_io.atomic import (
    atomic_write,
    file_sha256,
    load_checkpoint_safely,
    write_json_atomic,
)

MANIFEST_FORMAT = "medmetric-handoff/1"
PATH_KEYS = ("checkpoint", "backbone_weights", "head_weights", "projector_weights", "split_file", "stage1_run_dir")


class HandoffError(ValueError):
    """A manifest is missing, malformed, or does not match the stage-2 run."""


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
            f"`make train-stage1 DATA=<data> EXPERIMENT={name}` (or `python -m medmetric.experiments fit "
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
