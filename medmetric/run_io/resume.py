"""Which run a ``fit --ckpt_path ...`` continues, and where its new files go.

Policy (never overwrite a finished run, keep the interrupted run whole):

* ``--ckpt_path last``: the newest run folder of this experiment and stage that has
  ``checkpoints/last.ckpt`` and no ``results.json`` (i.e. it never finished) is continued *in
  place*: the same ``checkpoints/`` (so ModelCheckpoint keeps its best-so-far and ``last.ckpt``),
  the same handoff/results location. When no such run exists, a new run starts from scratch
  (so a requeued SLURM job can always pass ``--ckpt_path last``).
* ``--ckpt_path <run>/checkpoints/<file>.ckpt`` of an unfinished run: continued in place too.
* any other checkpoint (a finished run's, or a file elsewhere): a *new* run folder starts from it.

Every resumed segment writes its own ``config.yaml``, ``metrics.csv`` and ``resume.json``
(checkpoint, epoch, step, time) under ``<run>/resumes/<UTC time>/``; the files the first segment
wrote (``config.yaml``, ``metrics.csv``) are never touched.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from medmetric.run_io.atomic import atomic_write_text
from medmetric.run_io.run_folders import new_run_dir

log = logging.getLogger(__name__)

RESUME_CKPT_ENV = "MEDMETRIC_RESUME_CKPT"  # rank zero's resolved checkpoint, for DDP children
RESUME_SEGMENT_ENV = "MEDMETRIC_RESUME_SEGMENT"
RUN_NAME_ENV = "MEDMETRIC_RUN_NAME"  # an explicit run folder name shared by all nodes
FINISHED_MARKER = "results.json"


@dataclass
class ResumePlan:
    checkpoint: Path | None  # what Trainer.fit(ckpt_path=...) gets; None: start from scratch
    run_dir: Path | None  # the unfinished run continued in place; None: a new run folder
    segment: str | None = None  # resumes/<stamp>: this segment's logs inside run_dir

    @property
    def in_place(self) -> bool:
        return self.run_dir is not None


def is_finished(run_dir: Path) -> bool:
    return (run_dir / FINISHED_MARKER).exists()


def latest_unfinished_run(stage_dir: Path) -> Path | None:
    """Newest run folder (names are UTC times) with checkpoints/last.ckpt and no results.json."""
    if not stage_dir.is_dir():
        return None
    runs = sorted((p for p in stage_dir.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True)
    for run in runs:
        if (run / "checkpoints" / "last.ckpt").is_file() and not is_finished(run):
            return run
    return None


def plan_resume(ckpt_path: str | None, stage_dir: Path) -> ResumePlan:
    if not ckpt_path:
        return ResumePlan(None, None)
    stamp = "resumes/" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    if ckpt_path == "last":
        named = os.environ.get(RUN_NAME_ENV)
        run = latest_unfinished_run(stage_dir) if not named else stage_dir / named
        if run is not None and (is_finished(run) or not (run / "checkpoints" / "last.ckpt").is_file()):
            run = None
        if run is None:
            log.info("--ckpt_path last: no unfinished run under %s, starting a new run", stage_dir)
            return ResumePlan(None, None)
        return ResumePlan(run / "checkpoints" / "last.ckpt", run, stamp)
    checkpoint = Path(ckpt_path)
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"--ckpt_path {ckpt_path}: no such checkpoint. Pass a .ckpt file, or 'last' to continue the "
            f"newest unfinished run under {stage_dir}"
        )
    run = checkpoint.resolve().parent.parent
    if checkpoint.resolve().parent.name == "checkpoints" and (run / "config.yaml").is_file() and not is_finished(run):
        return ResumePlan(checkpoint, run, stamp)
    return ResumePlan(checkpoint, None)  # a finished run or a foreign file: a new run starts from it


def write_resume_record(folder: Path, plan: ResumePlan) -> None:
    """``resume.json``: what this run segment continued from (written before training starts)."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "checkpoint": str(plan.checkpoint.resolve()) if plan.checkpoint else None,
        "continued_in_place": plan.in_place,
        "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import torch

        state = torch.load(plan.checkpoint, map_location="cpu", weights_only=True)
        record.update(epoch=int(state.get("epoch", -1)), global_step=int(state.get("global_step", -1)))
    except Exception as err:  # the record is informative; Lightning reports unreadable checkpoints itself
        record["checkpoint_read_error"] = str(err)
    failed = plan.run_dir / "FAILED" if plan.in_place else None
    if failed is not None and failed.is_file():  # the run goes on: keep the failure with its segment
        record["previous_failure"] = failed.read_text().strip()
        os.replace(failed, folder / "FAILED.before-resume")
    atomic_write_text(folder / "resume.json", json.dumps(record, indent=2), what="resume record")


def resume_plan_for_process(ckpt_path: str | None, stage_dir: Path, is_ddp_child: bool) -> ResumePlan:
    """Rank zero plans; DDP children (started by Lightning with rank zero's environment) reuse
    its plan, so every rank resumes from the same file even if rank zero writes a new one."""
    if is_ddp_child and RESUME_CKPT_ENV in os.environ:
        inherited = os.environ[RESUME_CKPT_ENV]
        segment = os.environ.get(RESUME_SEGMENT_ENV) or None
        return ResumePlan(Path(inherited) if inherited else None, None, segment)
    plan = plan_resume(ckpt_path, stage_dir)
    os.environ[RESUME_CKPT_ENV] = str(plan.checkpoint) if plan.checkpoint else ""
    os.environ[RESUME_SEGMENT_ENV] = plan.segment or ""
    return plan


def named_or_new_run_dir(stage_dir: Path) -> Path:
    """``<stage>/$MEDMETRIC_RUN_NAME`` when set (multi-node launches, where every node must agree
    on one folder: e.g. the SLURM job id, which a requeued job keeps), else a new timestamped one.
    A named folder of a finished run is refused, never reused."""
    name = os.environ.get(RUN_NAME_ENV)
    if not name:
        return new_run_dir(stage_dir)
    run = stage_dir / name
    if is_finished(run):
        raise FileExistsError(
            f"{run} holds a finished run ({FINISHED_MARKER}); unset {RUN_NAME_ENV} or choose a new name"
        )
    run.mkdir(parents=True, exist_ok=True)
    return run
