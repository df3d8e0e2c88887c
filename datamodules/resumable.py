"""A training DataLoader that resumes mid-epoch and moves its sampler plan on every epoch.

Two things Lightning does not do for a ``DataLoader(batch_sampler=...)``:

* ``set_epoch``: Lightning calls it on ``loader.sampler`` and ``loader.batch_sampler.sampler``
  only, never on the batch sampler itself, so a planned batch sampler (samplers.py) would
  replay epoch 0's plan forever. :class:`EpochBatchSampler` exposes a ``sampler`` that receives
  the call and forwards it to the wrapped batch sampler (and to its own ``sampler``, e.g. a
  ``DistributedSampler`` inside a ``BatchSampler``).
* mid-epoch resume: a checkpoint written mid-epoch (on SIGTERM) records how many batches of the
  epoch were trained (in the DataModule's state: Lightning restores it before it builds the
  loaders, unlike the loaders' own state, which it applies only to loaders built after the loop
  state is restored -- too late when ``configure_optimizers`` asks for
  ``estimated_stepping_batches``). The next iteration of that same epoch then skips the trained
  batches at the *index* level (nothing is decoded), so the rest of the epoch is exactly what the
  uninterrupted run would have seen: the plans are functions of (seed, epoch) only.

Augmentation is a function of (seed, epoch, index) too (datamodules/transforms.py): every index
the loader yields is an :class:`EpochIndex`, an ``int`` that carries its epoch into the dataset
(also inside persistent DataLoader workers, which never see the sampler's ``set_epoch``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from torch.utils.data import DataLoader, Sampler


class EpochIndex(int):
    """A sample index (a plain ``int`` to every dataset) that knows the epoch it is drawn for."""

    epoch: int

    def __new__(cls, index: int, epoch: int) -> EpochIndex:
        obj = super().__new__(cls, index)
        obj.epoch = epoch
        return obj

    def __reduce__(self):  # to DataLoader workers
        return EpochIndex, (int(self), self.epoch)

    def __repr__(self) -> str:
        return f"EpochIndex({int(self)}, epoch={self.epoch})"


class _EpochSetter:
    """What Lightning finds as ``loader.batch_sampler.sampler``: it passes ``set_epoch`` on."""

    def __init__(self, owner: EpochBatchSampler):
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class EpochBatchSampler(Sampler[list[int]]):
    def __init__(self, batch_sampler):
        self.batch_sampler = batch_sampler
        self.sampler = _EpochSetter(self)
        self.epoch = 0
        self.skip: tuple[int, int] | None = None  # (epoch, batches to skip) from a checkpoint

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for target in (self.batch_sampler, getattr(self.batch_sampler, "sampler", None)):
            if callable(getattr(target, "set_epoch", None)):
                target.set_epoch(epoch)

    def __iter__(self):
        skip = 0
        if self.skip is not None and self.skip[0] == self.epoch:
            skip, self.skip = self.skip[1], None
        elif self.skip is not None and self.epoch > self.skip[0]:
            self.skip = None  # that epoch is over
        epoch = self.epoch
        for batch in itertools.islice(iter(self.batch_sampler), skip, None):
            yield [EpochIndex(i, epoch) for i in batch]

    def __len__(self) -> int:
        return len(self.batch_sampler)


class ResumableDataLoader(DataLoader):
    """``DataLoader(batch_sampler=EpochBatchSampler(...))`` whose state is the epoch progress.

    ``progress`` returns (epoch, batches of it already trained); the DataModule reads it from
    the Trainer, because only the loop knows what was trained (the loader prefetches ahead).
    """

    def __init__(self, dataset, batch_sampler, progress: Callable[[], tuple[int, int]], **kwargs):
        super().__init__(dataset, batch_sampler=EpochBatchSampler(batch_sampler), **kwargs)
        self.progress = progress

    def state_dict(self) -> dict:
        epoch, done = self.progress()
        return {"epoch": int(epoch), "batches_done": int(done)}

    def load_state_dict(self, state: dict) -> None:
        self.resume_at(state["epoch"], state["batches_done"])

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Continue epoch ``epoch`` after its first ``batches_done`` batches."""
        if 0 < batches_done < len(self.batch_sampler):  # finished epochs need no skipping
            self.batch_sampler.set_epoch(epoch)
            self.batch_sampler.skip = (epoch, batches_done)
