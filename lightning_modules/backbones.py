"""timm backbone factory: name, in_chans, optional local weights file -> (module, feature_dim).

No hub access: pretrained weights come only from a local file the user names, loaded with
``weights_only=True`` so a checkpoint cannot run code.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
from torch import nn

CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "head.fc.", "last_linear.")


def create_backbone(
    name: str, in_chans: int = 3, pretrained_path: str | None = None, **timm_kwargs
) -> tuple[nn.Module, int]:
    """Build ``timm.create_model(name, num_classes=0)`` (pooled features, no classifier)."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.6)
        raise ValueError(f"unknown timm model {name!r} (model.backbone); similar names: {close}")
    model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **timm_kwargs)
    if pretrained_path:
        load_backbone_weights(model, pretrained_path)
    return model, int(model.num_features)


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load a timm/torchvision-style state dict, ignoring only classifier weights.

    Accepts a bare state dict or one under ``state_dict``/``model``; strips a ``module.`` or
    ``backbone.`` prefix. Any other missing or unexpected key is an error naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path} (model.pretrained_path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, zip errors, unsafe globals
        raise ValueError(f"{path} is not a loadable weights file ({type(err).__name__}: {err})") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    state = {_strip(k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIXES)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        raise ValueError(
            f"{path} does not fit this backbone: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"other shapes {reshaped[:5]}. Was it saved from another architecture or in_chans?"
        )
    model.load_state_dict(state)


def _strip(key: str) -> str:
    for prefix in ("module.", "backbone."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key
