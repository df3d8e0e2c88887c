"""Refuse a Lightning checkpoint (``--ckpt_path``) saved from another model configuration.

Without this, a checkpoint of another class list or backbone fails deep in ``load_state_dict``
with a list of tensor shapes; this names the checkpoint, the setting that differs and the fix.
Called from :meth:`ClassifierModule.on_load_checkpoint`, before the weights are loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MUST_MATCH = ("class_names", "backbone", "in_chans", "backbone_kwargs", "embedding_dim", "strategy")


class CheckpointMismatchError(ValueError):
    """A checkpoint was saved from a model with other classes, backbone or head."""


def check_checkpoint_matches(checkpoint: Mapping[str, Any], hparams: Mapping[str, Any], model: str, where: str | None) -> None:
    saved = checkpoint.get("hyper_parameters") or {}
    for key in MUST_MATCH:
        mine, theirs = hparams.get(key), saved.get(key)
        if mine is not None and theirs is not None and _norm(theirs) != _norm(mine):
            raise CheckpointMismatchError(
                f"checkpoint {where or '(given)'} was saved from a {model} with {key}={saved[key]!r}, but this run "
                f"has {key}={hparams[key]!r} (model.{key}). Use a checkpoint of this configuration, set "
                f"model.{key} to match it, or leave out --ckpt_path"
            )


def _norm(value):
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _norm(v) for k, v in value.items()}
    return value
