"""W&B without an account: the one place that decides online, offline or off."""

from __future__ import annotations

import os
from pathlib import Path

WANDB_MODES = ("auto", "online", "offline", "disabled")


def has_wandb_key() -> bool:
    netrc = Path.home() / ".netrc"
    return bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))


def wandb_offline(mode: str) -> bool | None:
    """True/False for W&B offline/online, None when W&B is off.

    ``auto`` is online only with an API key (``WANDB_API_KEY`` or ``~/.netrc``); ``online``
    without a key also falls back to offline. ``WANDB_MODE=disabled|offline`` in the
    environment wins, as in wandb itself.
    """
    if mode not in WANDB_MODES:
        raise ValueError(f"unknown --wandb mode {mode!r}; valid: {list(WANDB_MODES)}")
    env_mode = os.environ.get("WANDB_MODE", "")
    if mode == "disabled" or env_mode == "disabled":
        return None
    if mode == "offline" or env_mode in ("offline", "dryrun"):
        return True
    return not has_wandb_key()
