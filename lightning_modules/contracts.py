"""What the CLI, the stage-1 handoff and the results writer read from a model: declared on the class.

Before, the CLI mapped class names to stages in a dict (``STAGE_OF_MODEL``) that had to be
edited for every new module, and looked up ``monitor`` with a silent default. Now a module
class declares ``stage`` and ``monitor`` (:class:`StagedModel`); the CLI reads them from the
class named by ``model.class_path`` before anything is instantiated (:func:`declared_stage`,
:func:`declared_monitor`), so a new module needs no edit of experiments/cli.py.

:class:`HandoffSource` is what callbacks/handoff.py reads from a stage-1 model and
:class:`TestResultsSource` what callbacks/results.py reads after ``trainer.test``; the
classifier and multi-label base classes provide them. Members are checked with
:func:`medmetric.datamodules.contracts.require`, which names what is missing and the fix.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import ClassVar, Protocol, runtime_checkable

from torch import Tensor, nn

from medmetric.datamodules.contracts import ContractError

STAGES = ("stage1", "stage2")


@runtime_checkable
class StagedModel(Protocol):
    """Class attributes the CLI reads from ``model.class_path`` (before instantiation)."""

    stage: ClassVar[str]
    """``stage1`` (trains a backbone; the CLI adds the handoff callback and the run goes to
    ``runs/<experiment>/stage1/``) or ``stage2`` (reads ``runs/<experiment>/handoff.json``,
    which the CLI fills into ``model.handoff`` and checks before instantiation)."""

    monitor: ClassVar[str]
    """The validation metric the best checkpoint is chosen on (mode max); never a ``test/`` key."""


@runtime_checkable
class HandoffSource(Protocol):
    """What callbacks/handoff.py (``stage1_manifest``) reads from a stage-1 model.

    ``head`` and ``projector`` are optional ``nn.Module`` members: saved when present (stage
    2's cRT/LWS start from the stage-1 head, kNN uses the projector), ``null`` otherwise.
    """

    class_names: list[str]
    feature_dim: int
    """Width of ``backbone(x)``; stage 2 builds its head on it."""
    backbone: nn.Module
    """The module whose weights go to ``backbone.pt`` (state-dict prefix ``backbone.``)."""
    hparams: Mapping
    """Lightning's saved init arguments; ``embedding_dim`` is read when present."""

    def backbone_config(self) -> dict:
        """``{"name", "in_chans", "kwargs"}``: what stage 2 needs to rebuild the backbone."""


HANDOFF_OPTIONAL_MODULES = ("head", "projector")


@runtime_checkable
class TestResultsSource(Protocol):
    """What callbacks/results.py reads after ``trainer.test`` (set in ``on_test_epoch_end``)."""

    class_names: list[str]
    test_results: dict[str, float] | None
    """Test metrics; None until a test ran (the writer then writes nothing)."""
    test_confusion: list[list[int]] | None
    """Single-label confusion matrix (rows: true class); None where it does not apply."""
    test_outputs: dict[str, Tensor] | None
    """Per-image ``probs``, ``targets`` (and ``embeddings``) for test_outputs.npz; None: none."""
    results_extra: Mapping
    """Extra results.json fields (multi-label: task, seen/unseen labels, F1 thresholds)."""


def _declared(model_class: type, name: str, class_path: str, example: str) -> str:
    value = inspect.getattr_static(model_class, name, None)  # declared on the class or a base class
    if not isinstance(value, str) or not value:
        raise ContractError(
            f"model.class_path {class_path} ({model_class.__qualname__}) does not declare `{name}`; "
            f"add the class attribute `{name}: ClassVar[str] = {example!r}` (see "
            f"medmetric.lightning_modules.contracts.StagedModel)"
        )
    return value


def declared_stage(model_class: type, class_path: str | None = None) -> str:
    """The ``stage`` a model class declares, checked to be stage1 or stage2."""
    class_path = class_path or f"{model_class.__module__}.{model_class.__qualname__}"
    stage = _declared(model_class, "stage", class_path, "stage1")
    if stage not in STAGES:
        raise ContractError(f"model.class_path {class_path} declares stage={stage!r}; valid: {list(STAGES)}")
    return stage


def declared_monitor(model_class: type, class_path: str | None = None) -> str:
    """The checkpoint ``monitor`` a model class declares (a ``val/`` metric)."""
    class_path = class_path or f"{model_class.__module__}.{model_class.__qualname__}"
    return _declared(model_class, "monitor", class_path, "val/balanced_accuracy")
