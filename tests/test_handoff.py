"""Handoff manifest: written with relative paths, read back, and refused when it does not match."""

import json
import shutil

import pytest
import torch

from medmetric.run_io.atomic import file_sha256
from medmetric.run_io.manifest import (
    MANIFEST_FORMAT,
    HandoffError,
    check_manifest,
    read_manifest,
    write_manifest,
)

CLASSES = ["a", "b", "c"]


@pytest.fixture
def manifest_path(tmp_path):
    run = tmp_path / "exp" / "stage1" / "run1"
    run.mkdir(parents=True)
    torch.save({"w": torch.ones(2)}, run / "backbone.pt")
    (tmp_path / "exp" / "split.csv").write_text("image_id,group,label,split\n")
    manifest = {
        "format": MANIFEST_FORMAT,
        "stage1_run_dir": str(run),
        "checkpoint": None,
        "backbone_weights": str(run / "backbone.pt"),
        "backbone_weights_sha256": file_sha256(run / "backbone.pt"),
        "backbone": {"name": "test_resnet", "in_chans": 3, "kwargs": {}},
        "class_names": CLASSES,
        "split_file": str(tmp_path / "exp" / "split.csv"),
        "split_sha256": "abc",
    }
    path = tmp_path / "exp" / "handoff.json"
    write_manifest(path, manifest)
    return path


def test_paths_are_stored_relative_so_the_experiment_folder_can_move(manifest_path, tmp_path):
    stored = json.loads(manifest_path.read_text())
    assert stored["backbone_weights"] == "stage1/run1/backbone.pt"
    moved = shutil.move(str(tmp_path / "exp"), str(tmp_path / "moved"))
    manifest = read_manifest(f"{moved}/handoff.json")
    assert manifest["backbone_weights"] == str((tmp_path / "moved/stage1/run1/backbone.pt").resolve())


def test_matching_manifest_passes(manifest_path):
    check_manifest(read_manifest(manifest_path), class_names=CLASSES, backbone="test_resnet", split_sha256="abc")


def test_mismatches_are_refused_with_the_fix(manifest_path):
    manifest = read_manifest(manifest_path)
    with pytest.raises(HandoffError, match=r"trained on classes \['a', 'b', 'c'\] but this run has \['a', 'b'\]"):
        check_manifest(manifest, class_names=["a", "b"])
    with pytest.raises(HandoffError, match=r"backbone is 'test_resnet' but model.backbone='resnet18'"):
        check_manifest(manifest, backbone="resnet18")
    with pytest.raises(HandoffError, match=r"data split differs.*--data.split_file="):
        check_manifest(manifest, split_sha256="other")


def test_missing_manifest_says_which_command_to_run_first(tmp_path):
    with pytest.raises(HandoffError, match=r"no stage-1 handoff manifest.*make train-stage1 DATA=<data> EXPERIMENT=myexp"):
        read_manifest(tmp_path / "myexp" / "handoff.json", experiment="myexp")


def test_changed_or_missing_backbone_weights_are_refused(manifest_path):
    weights = manifest_path.parent / "stage1/run1/backbone.pt"
    torch.save({"w": torch.zeros(2)}, weights)
    with pytest.raises(HandoffError, match="changed since the manifest was written"):
        read_manifest(manifest_path)
    weights.unlink()
    with pytest.raises(HandoffError, match="backbone weights .* are missing"):
        read_manifest(manifest_path)


def test_not_a_manifest_is_refused(tmp_path):
    (tmp_path / "handoff.json").write_text('{"hello": 1}')
    with pytest.raises(HandoffError, match="not a medmetric handoff manifest"):
        read_manifest(tmp_path / "handoff.json")
    (tmp_path / "handoff.json").write_text("{broken")
    with pytest.raises(HandoffError, match="not valid JSON"):
        read_manifest(tmp_path / "handoff.json")


def test_write_is_atomic_and_leaves_no_temporary_files(manifest_path):
    assert sorted(p.name for p in manifest_path.parent.iterdir()) == ["handoff.json", "split.csv", "stage1"]


def test_split_mismatch_without_a_saved_split_file_still_explains_itself():
    """A manifest from a stage 1 whose split lived in memory has no split_file: the refusal must
    still be a HandoffError with a fix, not a KeyError."""
    manifest = {"path": "runs/x/handoff.json", "class_names": ["a", "b"], "backbone": {"name": "test_resnet"},
                "split_sha256": "0" * 64}
    with pytest.raises(HandoffError, match="data split differs.*kept in memory.*Re-run stage 1 with a saved split"):
        check_manifest(manifest, split_sha256="1" * 64)
