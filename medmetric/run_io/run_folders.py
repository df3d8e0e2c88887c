"""The run layout on disk, and new run folders that are never reused.

    runs/<experiment>/split.csv               the grouped split, shared by all its runs
    runs/<experiment>/handoff.json            latest stage-1 manifest (stage 2 reads it)
    runs/<experiment>/<stage>/<timestamp>/    one run: config.yaml, checkpoints/, metrics.csv,
                                              wandb/, results.json (and handoff.json, backbone.pt)
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

RUN_DIR_ENV = "MEDMETRIC_RUN_DIR"  # lets DDP worker processes join rank zero's run folder


@dataclass
class RunPaths:
    experiment: str
    stage: str
    experiment_dir: Path
    run_dir: Path

    @property
    def split_file(self) -> Path:
        return self.experiment_dir / "split.csv"

    @property
    def handoff(self) -> Path:
        return self.experiment_dir / "handoff.json"


def new_run_dir(parent: Path) -> Path:
    """A fresh, never-reused folder named by UTC time (suffixed if two runs start together)."""
    parent.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        candidate = parent / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run folder under {parent}")
