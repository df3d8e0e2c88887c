"""The ``bad_image_policy`` of a DataModule: stop on an unreadable image, or skip it visibly.

``error`` (default) re-raises :class:`~medmetric.datamodules.images.ImageReadError`, which names the file.
``skip`` drops the image from its batch, logs it, and appends its path to a counter file, so the
count is right whatever process decoded it (DataLoader workers are separate processes, under
fork, forkserver or spawn) and survives pickling. The total goes into results.json.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

from torch.utils.data import default_collate

BAD_IMAGE_POLICIES = ("error", "skip")


def check_policy(policy: str) -> str:
    if policy not in BAD_IMAGE_POLICIES:
        raise ValueError(f"unknown bad image policy {policy!r} (data.bad_image_policy); valid: {list(BAD_IMAGE_POLICIES)}")
    return policy


class SkipCounter:
    """Paths of skipped images, one per line in a file every process appends to (O_APPEND)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else Path(tempfile.gettempdir()) / f"medmetric-skipped-{uuid.uuid4().hex}.txt"

    def add(self, image_path: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (str(image_path).replace("\n", " ") + "\n").encode())
        finally:
            os.close(fd)

    @property
    def paths(self) -> list[str]:
        return self.path.read_text().splitlines() if self.path.is_file() else []

    @property
    def value(self) -> int:
        return len(self.paths)


def skip_unreadable_collate(batch: list):
    """``default_collate`` without the ``None`` items of skipped images."""
    kept = [item for item in batch if item is not None]
    if not kept:
        raise RuntimeError(
            f"all {len(batch)} images of a batch were unreadable (data.bad_image_policy=skip); the data "
            "set is badly damaged: run `medmetric check-data` to list the unreadable files"
        )
    return default_collate(kept)
