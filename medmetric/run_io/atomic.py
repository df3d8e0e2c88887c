"""Atomic file writes (temp file, fsync, rename, fsync folder) and safe checkpoint loading.

Every file medmetric writes goes through :func:`atomic_write`, so no writer re-implements the
temp-file-and-rename dance (and forgets the fsync).

A write goes to a temporary file in the target's folder, is flushed and fsync'ed, and only
then renamed over the target (``os.replace`` is atomic on POSIX), after which the folder is
fsync'ed so the rename itself survives a power cut. So:

* killed (SIGKILL, OOM, power) at any point: the target is either the old complete file or
  the new complete file, never a mix; at worst a ``.<name>.tmp-<pid>`` file is left behind,
  whose name no loader reads, and the next write of that file deletes it;
* disk full (``ENOSPC``) or any other write error: the temporary file is removed, the old
  target is untouched, and the error says which file could not be written and why.

``medmetric.callbacks.atomic_checkpoint.AtomicCheckpointIO`` plugs this into Lightning, so
``best-*.ckpt`` and ``last.ckpt`` are written the same way; :func:`load_checkpoint_safely`
loads with ``weights_only=True`` and names the file when it cannot.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


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


def atomic_write_bytes(path: str | Path, data: bytes, what: str = "file") -> Path:
    """:func:`atomic_write` of a bytes object."""
    return atomic_write(path, lambda handle: handle.write(data), what=what)


def atomic_write_text(path: str | Path, text: str, what: str = "file") -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write_bytes(path, text.encode(), what=what)


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write to a temporary file, fsync and rename: a crash or a full disk never leaves a
    half-written JSON, and the previous version stays intact (:func:`atomic_write`)."""
    text = (json.dumps(payload, indent=2, default=float) + "\n").encode()
    atomic_write(path, lambda handle: handle.write(text), what=f"JSON file ({path.name})")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
