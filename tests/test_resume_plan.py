"""Which run ``fit --ckpt_path ...`` continues (experiments/resume.py), on hand-made run folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from medmetric.run_io.resume import RUN_NAME_ENV, named_or_new_run_dir, plan_resume


def make_run(stage_dir: Path, name: str, finished: bool, last: bool = True) -> Path:
    run = stage_dir / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("x: 1\n")
    if last:
        (run / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    (run / "checkpoints" / "best-epoch000.ckpt").write_bytes(b"ckpt")
    if finished:
        (run / "results.json").write_text("{}")
    return run


def test_last_continues_the_newest_unfinished_run_in_place(tmp_path):
    make_run(tmp_path, "20260101-000000", finished=False)
    newest_unfinished = make_run(tmp_path, "20260102-000000", finished=False)
    make_run(tmp_path, "20260103-000000", finished=True)  # newer, but finished: never resumed
    make_run(tmp_path, "20260104-000000", finished=False, last=False)  # crashed before any checkpoint
    plan = plan_resume("last", tmp_path)
    assert plan.run_dir == newest_unfinished and plan.in_place
    assert plan.checkpoint == newest_unfinished / "checkpoints" / "last.ckpt"
    assert plan.segment.startswith("resumes/")


def test_last_without_an_unfinished_run_starts_fresh(tmp_path):
    make_run(tmp_path, "20260103-000000", finished=True)
    plan = plan_resume("last", tmp_path)
    assert plan.checkpoint is None and plan.run_dir is None
    assert plan_resume("last", tmp_path / "no-such-stage").checkpoint is None


def test_an_explicit_checkpoint_continues_its_unfinished_run_but_never_a_finished_one(tmp_path):
    unfinished = make_run(tmp_path, "a", finished=False)
    finished = make_run(tmp_path, "b", finished=True)
    plan = plan_resume(str(unfinished / "checkpoints" / "best-epoch000.ckpt"), tmp_path)
    assert plan.run_dir == unfinished
    plan = plan_resume(str(finished / "checkpoints" / "last.ckpt"), tmp_path)
    assert plan.run_dir is None and plan.checkpoint == finished / "checkpoints" / "last.ckpt"  # a new run from it
    foreign = tmp_path / "elsewhere.ckpt"
    foreign.write_bytes(b"ckpt")
    assert plan_resume(str(foreign), tmp_path).run_dir is None
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        plan_resume(str(tmp_path / "missing.ckpt"), tmp_path)


def test_named_run_folder_is_shared_but_a_finished_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(RUN_NAME_ENV, "job-42")
    first = named_or_new_run_dir(tmp_path)
    assert first == tmp_path / "job-42" and named_or_new_run_dir(tmp_path) == first  # every node, every requeue
    (first / "checkpoints").mkdir()
    (first / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    make_run(tmp_path, "99999999-999999", finished=False)  # newer by name, but not this job's
    assert plan_resume("last", tmp_path).run_dir == first
    (first / "results.json").write_text("{}")
    with pytest.raises(FileExistsError, match="finished run"):
        named_or_new_run_dir(tmp_path)
    monkeypatch.delenv(RUN_NAME_ENV)
    assert named_or_new_run_dir(tmp_path).parent == tmp_path  # a fresh timestamped folder
