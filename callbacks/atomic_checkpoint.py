"""Atomic writes for checkpoints and manifests, and safe loading of checkpoints.

A write goes to a temporary file in the target's folder, is flushed and fsync'ed, and only
then renamed over the target (``os.replace`` is atomic on POSIX), after which the folder is
fsync'ed so the rename itself survives a power cut. So:

* killed (SIGKILL, OOM, power) at any point: the target is either the old complete file or
  the new complete file, never a mix; at worst a ``.<name>.tmp-<pid>`` file is left behind,
  whose name no loader reads, and the next write of that file deletes it;
* disk full (``ENOSPC``) or any other write error: the temporary file is removed, the old
  target is untouched, and the error says which file could not be written and why.

:class:`AtomicCheckpointIO` plugs this into Lightning (``Trainer(plugins=[...])``; the CLI adds
it), so ModelCheckpoint's ``best-*.ckpt`` and ``last.ckpt`` are written atomically, and loads
every checkpoint with ``weights_only=True``, with an error naming the file when it is not a
checkpoint or would need to run code to load.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicWriteError(OSError):
    """Writing a file failed; the previous version of the file is intact."""


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete ``.<name>.tmp-<pid>`` files left by a killed writer (its pid no longer runs)."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            stale.unlink(missing_ok=True)
        except PermissionError:
            pass  # another user's live process


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], what: str = "file") -> Path:
    """Write ``path`` by calling ``write(handle)`` on a temporary file, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            reason = "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else str(err)
            state = "the previous version is intact" if path.exists() else "no file was written"
            raise AtomicWriteError(
                err.errno, f"could not write {what} {path}: {reason}; {state} and no partial file was left. "
                "Free space (or fix the cause) and run again"
            ) from err
        raise
    _fsync_folder(path.parent)
    return path


def load_checkpoint_safely(path: str | Path, map_location: Any = "cpu", what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` with errors that name the file and say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # UnpicklingError (unsafe globals), RuntimeError (not a zip), EOFError
        text = str(err)
        if "Weights only load failed" in text or "Unsupported global" in text:
            why = ("it needs to run code (pickled objects beyond tensors and plain containers) to load, "
                   "which medmetric refuses for files it did not write itself")
        else:
            why = f"it is not a PyTorch checkpoint or it is truncated ({type(err).__name__}: {text.splitlines()[0] if text else ''})"
        raise ValueError(f"cannot load {what} {path}: {why}. Point at a checkpoint written by medmetric/Lightning") from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic saves, ``weights_only=True`` loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_write(path, lambda handle: torch.save(checkpoint, handle), what="checkpoint")

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        map_location = map_location or (lambda storage, loc: storage)
        return load_checkpoint_safely(path, map_location=map_location)
