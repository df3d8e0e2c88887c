"""What models, callbacks and the CLI read from a DataModule: declared, checked, never guessed.

Before these contracts the readers looked members up with ``getattr``/``hasattr`` and, when one
was missing, quietly did less: stage 2 skipped its split and fingerprint checks, results.json
got ``dataset_fingerprint: null``, shot-group accuracies vanished. Each reader now names the
:class:`typing.Protocol` it needs and calls :func:`require`; a DataModule that lacks a member
is refused with the class, the missing members, who needs them and the fix.

:class:`~medmetric.datamodules.base.ImageClassificationDataModule` provides every member of
:class:`ClassificationData`; :class:`~medmetric.datamodules.chest_xray.ChestXray14DataModule`
adds :class:`MultiLabelData`. A DataModule written from scratch implements what its readers
require (the Protocols list it), or subclasses the base class.

The Protocols are ``runtime_checkable`` for ``isinstance`` in user code, but :func:`require`
checks with :func:`inspect.getattr_static`: on Python 3.11 ``isinstance`` against a Protocol
*evaluates* properties, and ``class_counts`` / ``split_sha256`` raise before ``setup()``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

_MISSING = object()


class ContractError(TypeError):
    """A DataModule or model lacks a member that a reader needs (see :func:`require`)."""


@runtime_checkable
class TrainingCounts(Protocol):
    """The training class counts.

    Read by ``ClassifierModule.setup`` (many/medium/few-shot groups), ``MetricPretrainModule``
    (re-balancing head losses, class-weighted metric losses), the stage-1 handoff
    (``class_counts`` in the manifest, from which stage 2 builds its losses) and the results
    writer (``train_class_counts``).
    """

    @property
    def class_counts(self) -> list[int]:
        """Training images per class (multi-label: positives per label), ``class_names`` order."""


@runtime_checkable
class LabelledData(TrainingCounts, Protocol):
    """The class list with its training counts: read by stage 2 (the class list must equal the
    stage-1 manifest's) and by the CLI (``data.class_names`` is linked to ``model.class_names``)."""

    @property
    def class_names(self) -> list[str]:
        """Class (label) names in target-index order; must equal the model's ``class_names``."""


@runtime_checkable
class SplitIdentity(Protocol):
    """Which images a run saw, so stage 2 and the report can refuse a run on other data.

    Read by the stage-1 handoff (written to the manifest), ``RebalancedHeadModule`` and
    ``MultiLabelHeadModule`` (checked against the manifest) and the results writer
    (``dataset_fingerprint``, compared across runs by ``medmetric report``).
    """

    split_file: Path | None
    """The split CSV (image id -> train/val/test); recorded in the manifest."""

    data_dir: Path
    """Root folder of the data set; recorded in the manifest."""

    def split_sha256(self) -> str:
        """Content hash of the split (image id -> split); equal splits give equal hashes."""

    def fingerprint(self) -> str:
        """Hash of ids, relative paths, file sizes, labels, groups and split (integrity.py)."""


@runtime_checkable
class OrderedEvalData(Protocol):
    """A deterministic, unshuffled pass over a split, read by stage 2's post-hoc strategies
    (NCM, kNN, tau-norm fit on every training feature) and by the feature cache."""

    def ordered_dataloader(self, split: str, sharded: bool = True):
        """Loader over ``split`` (train/val/test) with the eval transform, in a fixed order."""


@runtime_checkable
class SkippedImagesCount(Protocol):
    """Read by the results writer, so results.json says how many unreadable images a run skipped."""

    @property
    def skipped_images(self) -> int:
        """Images skipped under ``bad_image_policy=skip`` (0 when nothing was skipped)."""


@runtime_checkable
class BatchSizeData(Protocol):
    """Read by lightning_modules/lr_scaling.py: ``model.lr_scaling`` scales to the global batch."""

    batch_size: int
    """Images per device per step (the global batch is this x world size x accumulation)."""


@runtime_checkable
class RankShardedData(Protocol):
    """Read by the CLI: True means every loader shards itself under DDP, so the CLI turns off
    Lightning's ``use_distributed_sampler`` (whose wrapping would break batch samplers)."""

    shards_by_rank: bool


@runtime_checkable
class ClassificationData(LabelledData, SplitIdentity, OrderedEvalData, SkippedImagesCount, BatchSizeData,
                         RankShardedData, Protocol):
    """Everything a medmetric model and its callbacks read from a DataModule (the base class has it)."""


@runtime_checkable
class MultiLabelData(TrainingCounts, Protocol):
    """Extra members the multi-label modules read (``loss_from_datamodule``, GZSL mode)."""

    @property
    def num_train_images(self) -> int:
        """Training images (the negatives of a label are ``num_train_images - class_counts[i]``)."""

    unseen_labels: Sequence[str]
    """Generalised zero-shot: labels held out of train and val (empty: ordinary multi-label)."""


BASE_CLASS = "medmetric.datamodules.base.ImageClassificationDataModule"
MULTILABEL_FIX = ("use a multi-label DataModule (e.g. medmetric.datamodules.chest_xray.ChestXray14DataModule) or "
                  "implement the members of medmetric.datamodules.contracts.MultiLabelData")


def protocol_members(protocol: type) -> list[str]:
    """The member names a Protocol declares (its own and its bases'), in declaration order."""
    names: list[str] = []
    for klass in reversed(protocol.__mro__):
        if klass is object or not getattr(klass, "_is_protocol", False) or klass is Protocol:
            continue
        for name in [*klass.__dict__.get("__annotations__", {}), *klass.__dict__]:
            if not name.startswith("_") and name not in names:
                names.append(name)
    return names


def missing_members(obj: object, protocol: type) -> list[str]:
    """Members of ``protocol`` that ``obj`` lacks, found without evaluating properties."""
    return [name for name in protocol_members(protocol) if not has_member(obj, name)]


def has_member(obj: object, name: str) -> bool:
    """``hasattr`` without running properties; a torch module's submodules, parameters and
    buffers live in ``_modules``/``_parameters``/``_buffers``, not in the instance dict."""
    if inspect.getattr_static(obj, name, _MISSING) is not _MISSING:
        return True
    state = getattr(obj, "__dict__", {})
    return any(name in (state.get(store) or {}) for store in ("_modules", "_parameters", "_buffers"))


def require(obj: object, protocol: type, reader: str, fix: str | None = None):
    """Return ``obj`` if it has every member of ``protocol``, else raise :class:`ContractError`.

    ``reader`` says who needs the members (it goes into the message); ``fix`` overrides the
    default advice (subclass the DataModule base class or implement the members).
    """
    if obj is None:
        raise ContractError(f"{reader} needs a DataModule ({protocol.__name__}), but the trainer has none: "
                            f"pass datamodule=... (a subclass of {BASE_CLASS})")
    missing = missing_members(obj, protocol)
    if missing:
        listed = ", ".join(missing)
        advice = fix or f"subclass {BASE_CLASS} or implement {listed} (see medmetric.datamodules.contracts.{protocol.__name__})"
        raise ContractError(f"{type(obj).__module__}.{type(obj).__qualname__} lacks {listed}, which {reader} needs; {advice}")
    return obj
