"""Issue 8 beyond the matrix: leakage refusal on a crafted split, duplicates, the dataset
fingerprint (stage 2 and report refuse a mismatch unless told), selection on validation only,
the bad-image ``skip`` policy under DataLoader workers, killed-while-writing, safe loading,
the config class_path allow-list, failed runs marked, and ``medmetric check-data``.
"""

from __future__ import annotations

import ast
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from medmetric.callbacks.atomic_checkpoint import AtomicCheckpointIO
from medmetric.callbacks.selection_guard import SelectionOnTestError, ValidationOnlySelection
from medmetric.datamodules.images import ImageReadError
from medmetric.datamodules.integrity import GroupLeakError
from medmetric.datamodules.skin import HAM10000DataModule
from medmetric.datamodules.splits import write_split_csv
from medmetric.experiments import check_data, report
from medmetric.experiments.safe_config import ALLOW_ENV, UntrustedClassPathError, check_class_paths
from medmetric.lightning_modules.backbones import create_backbone, load_backbone_weights
from medmetric.run_io.atomic import load_checkpoint_safely
from medmetric.run_io.manifest import HandoffError, check_manifest, read_manifest, write_manifest
from tests.conftest import REPO, make_stage1_handoff, require_real_ham10000

FAST = {"image_size": 32, "num_workers": 0, "batch_size": 16}
HAM_META = "HAM10000_metadata.csv"


def ham(root, **kwargs) -> HAM10000DataModule:
    return HAM10000DataModule(str(root), **{**FAST, **kwargs})


def set_up(root, **kwargs) -> HAM10000DataModule:
    dm = ham(root, **kwargs)
    dm.setup()
    return dm


# ============================================================================ leakage


def test_crafted_split_with_a_lesion_in_train_and_test_is_refused_naming_it(ham_root, tmp_path):
    table = set_up(ham_root).table.copy()
    sizes = table.groupby("group").size()
    lesion = sizes.index[sizes >= 2][0]  # a lesion with two images: put one in train, one in test
    rows = np.flatnonzero(table["group"].to_numpy() == lesion)
    table.loc[rows[0], "split"], table.loc[rows[1], "split"] = "train", "test"
    split_file = tmp_path / "split.csv"
    write_split_csv(split_file, table)
    before = split_file.read_bytes()
    with pytest.raises(GroupLeakError) as err:
        ham(ham_root, split_file=str(split_file)).setup()
    message = str(err.value)
    ids = table["image_id"].to_numpy()[rows]
    assert f"1 lesions appear in more than one split ['{lesion}']" in message
    assert f"lesion '{lesion}' in train+test (images {ids[0]}, {ids[1]}" in message
    assert f"delete {split_file}" in message and "--data.split_file=<new path>" in message
    assert split_file.read_bytes() == before  # the user's file is never rewritten


def test_duplicate_images_across_splits_are_reported(ham_copy, caplog):
    dm = set_up(ham_copy)
    table = dm.table
    a = table[table["split"] == "train"].iloc[0]
    b = table[table["split"] == "test"].iloc[0]
    shutil.copyfile(a["path"], b["path"])  # same bytes under another id, in another split
    with caplog.at_level("WARNING", logger="medmetric.datamodules.integrity"):
        set_up(ham_copy)  # same seed, same labels and groups: the same split
    (warning,) = [m for m in caplog.messages if "byte-identical" in m]
    assert "1 sets of byte-identical images sit in different splits" in warning
    assert a["image_id"] in warning and b["image_id"] in warning and "train+test" in warning


# ============================================================================ fingerprint


def test_fingerprint_follows_files_labels_and_split_but_not_location_or_mtime(ham_copy, tmp_path):
    base = set_up(ham_copy).fingerprint()
    moved = Path(shutil.copytree(ham_copy, tmp_path / "elsewhere"))  # new location, new mtimes
    os.utime(next((moved / "images").iterdir()), (1, 1))
    assert set_up(moved).fingerprint() == base
    assert set_up(moved, split_seed=7).fingerprint() != base  # another split
    image = next((moved / "images").iterdir())
    image.write_bytes(image.read_bytes() + b"\0")  # a file changed size
    resized = set_up(moved).fingerprint()
    assert resized != base
    meta = pd.read_csv(moved / HAM_META, dtype=str, keep_default_na=False)
    meta.loc[meta["dx"] == "nv", "dx_type"] = "edited"  # a column medmetric does not use: no change
    meta.to_csv(moved / HAM_META, index=False)
    assert set_up(moved).fingerprint() == resized
    first = meta.index[meta["dx"] == "nv"][0]
    meta.loc[first, "dx"] = "mel"  # a label changed
    meta.to_csv(moved / HAM_META, index=False)
    assert set_up(moved).fingerprint() != resized


def test_stage2_refuses_a_manifest_of_other_data_unless_allowed(tmp_path):
    manifest = read_manifest(make_stage1_handoff(tmp_path, ["a", "b"]))
    manifest["dataset_fingerprint"] = "1" * 64
    with pytest.raises(HandoffError, match=r"--model\.allow_fingerprint_mismatch=true") as err:
        check_manifest(manifest, fingerprint="2" * 64)
    assert "111111111111 in the manifest, 222222222222 now" in str(err.value)
    check_manifest(manifest, fingerprint="2" * 64, allow_fingerprint_mismatch=True)
    check_manifest(manifest, fingerprint="1" * 64)


def _fake_run(root: Path, name: str, fingerprint: str) -> Path:
    run = root / name / "stage1" / "20260101-120000"
    run.mkdir(parents=True)
    results = {"experiment": name, "stage": "stage1", "class_names": ["a", "b"], "metrics": {"balanced_accuracy": 0.5},
               "confusion_matrix": [[1, 0], [0, 1]], "dataset_fingerprint": fingerprint}
    (run / "results.json").write_text(json.dumps(results))
    return run


def test_report_refuses_runs_on_different_data_unless_allowed(tmp_path, capsys):
    runs = tmp_path / "runs"
    _fake_run(runs, "ce", "a" * 64)
    _fake_run(runs, "supcon", "b" * 64)
    assert report.main([str(runs), "--out", str(tmp_path / "r1"), "--wandb", "disabled"]) == 2
    error = capsys.readouterr().err
    assert "different data (dataset fingerprints aaaaaaaaaaaa: " in error and "--allow_fingerprint_mismatch" in error
    assert not (tmp_path / "r1").exists()
    assert report.main([str(runs), "--out", str(tmp_path / "r2"), "--wandb", "disabled", "--allow_fingerprint_mismatch"]) == 0


# ============================================================================ selection


@pytest.mark.parametrize("callback", [ModelCheckpoint(monitor="test/balanced_accuracy", mode="max"), EarlyStopping(monitor="test/macro_f1")])
def test_selecting_on_test_is_refused(callback, tmp_path):
    trainer = L.Trainer(callbacks=[callback, ValidationOnlySelection()], logger=False, default_root_dir=tmp_path,
                        enable_progress_bar=False, max_epochs=1)
    model = BoringModel()
    with pytest.raises(SelectionOnTestError, match=r"would select on the test split.*val/balanced_accuracy"):
        trainer.fit(model)
    assert not list(tmp_path.rglob("*.ckpt"))  # refused before the first step


# ============================================================================ bad image policy


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_policy_counts_and_logs_unreadable_images_across_workers(ham_copy, workers):
    dm = set_up(ham_copy, bad_image_policy="skip", num_workers=workers, eval_batch_size=32)
    val = dm.datasets["val"]
    bad = [val.paths[1], val.paths[len(val) - 2]]
    Path(bad[0]).write_bytes(b"")
    Path(bad[1]).write_bytes(Path(bad[1]).read_bytes()[:300])
    seen = sum(len(targets) for _, targets in dm.val_dataloader())
    assert seen == len(val) - 2  # exactly the two bad images are missing from the batches
    assert dm.skipped_images == 2 and sorted(dm.skipped.paths) == sorted(bad)

    strict = set_up(ham_copy, num_workers=workers)  # default policy: error, naming the file
    with pytest.raises((ImageReadError, RuntimeError), match=re.escape(bad[0])):
        list(strict.val_dataloader())


def test_skip_policy_with_preload_skips_at_fetch_time(ham_copy):
    paths = set_up(ham_copy).datasets["test"].paths
    Path(paths[0]).write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match=re.escape(paths[0])):
        set_up(ham_copy, preload=True)  # default policy: the preload stops, naming the file
    dm = set_up(ham_copy, preload=True, bad_image_policy="skip")
    assert sum(len(targets) for _, targets in dm.test_dataloader()) == len(paths) - 1
    assert dm.skipped.paths == [paths[0]]


# ============================================================================ killed while writing

def _write_and_die(where: str, target: str, ckpt: Path, manifest: Path) -> None:
    """Child process: start overwriting ``target`` and get SIGKILLed inside the write."""
    die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    if where == "before_replace":  # the new file is complete in its .tmp, the rename never happens
        os.replace = die
    else:  # killed with half of the bytes written
        real_save = torch.save

        def dying_save(obj, handle, *args, **kwargs):
            real_save(obj, handle, *args, **kwargs)
            handle.truncate(500)
            handle.flush()
            die()

        torch.save = dying_save
        os.fsync = die  # the manifest: its bytes are written, killed before they are synced
    if target == "checkpoint":
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.full((64,), 2.0)}}, ckpt)
    else:
        write_manifest(manifest, {**read_manifest(manifest), "class_counts": [999, 999]})
    os._exit(0)  # not reached when the kill works


@pytest.mark.parametrize("where", ["before_replace", "mid_write"])
@pytest.mark.parametrize("target", ["checkpoint", "manifest"])
def test_killed_while_writing_leaves_the_previous_file_loadable(tmp_path, where, target):
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.full((64,), 1.0)}}, ckpt)
    manifest = make_stage1_handoff(tmp_path, ["a", "b"], counts=[5, 7])
    child = multiprocessing.get_context("fork").Process(target=_write_and_die, args=(where, target, ckpt, manifest))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL
    assert AtomicCheckpointIO().load_checkpoint(ckpt)["state_dict"]["w"].tolist() == [1.0] * 64
    assert read_manifest(manifest)["class_counts"] == [5, 7]
    leftovers = [p.name for p in tmp_path.rglob(".*.tmp-*")]
    assert len(leftovers) <= 1 and all(not name.endswith((".ckpt", ".json")) for name in leftovers)
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.full((64,), 3.0)}}, ckpt)
    write_manifest(manifest, read_manifest(manifest))
    assert not list(tmp_path.rglob(".*.tmp-*"))  # the next write cleans up after the dead writer


# ============================================================================ safe loading


class Payload:
    """Unpickling this would create a marker file (a stand-in for running any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_is_refused_everywhere_a_user_file_is_loaded(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": Payload(marker)}, evil)
    with pytest.raises(ValueError, match=r"needs to run code .* which medmetric refuses") as err:
        load_checkpoint_safely(evil)
    assert str(evil) in str(err.value)
    with pytest.raises(ValueError, match="needs to run code"):
        AtomicCheckpointIO().load_checkpoint(evil)  # Trainer(ckpt_path=...) in the CLI
    model, _ = create_backbone("test_resnet")
    with pytest.raises(ValueError, match="not a loadable weights file"):
        load_backbone_weights(model, evil)  # model.pretrained_path
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the control: a plain unsafe load would have run it
    assert marker.exists()


def test_every_torch_load_in_the_package_uses_weights_only_true():
    offenders = []
    for folder in ("callbacks", "datamodules", "experiments", "lightning_modules", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                    flag = {k.arg: ast.unparse(k.value) for k in node.keywords}.get("weights_only")
                    if flag != "True":
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_config_class_paths_must_come_from_trusted_packages(monkeypatch):
    config = {"model": {"class_path": "medmetric.lightning_modules.metric_pretrain.MetricPretrainModule"},
              "trainer": {"callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"},
                                        {"class_path": "shady_pkg.hooks.Exfiltrate"}]}}
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(UntrustedClassPathError) as err:
        check_class_paths(config)
    message = str(err.value)
    assert "config key trainer.callbacks[1].class_path names 'shady_pkg.hooks.Exfiltrate'" in message
    assert "--allow_class_paths=shady_pkg" in message and f"{ALLOW_ENV}=shady_pkg" in message
    check_class_paths(config, "other,shady_pkg")
    monkeypatch.setenv(ALLOW_ENV, "shady_pkg")
    check_class_paths(config)


@pytest.mark.parametrize("path", [
    "tests.test_trustworthy_runs.Toy",  # this repository's tests are not trusted by default
    "bench.metric_losses.Anything",
    "lightning_modules.metric_pretrain.MetricPretrainModule",  # the old generic top-level name
    "medmetric_evil.Module",  # a prefix of the name, not the package
])
def test_only_medmetric_and_the_field_libraries_are_trusted_by_default(path, monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(UntrustedClassPathError, match=r"--allow_class_paths="):
        check_class_paths({"model": {"class_path": path}})


def test_a_named_module_is_allowed_with_what_is_below_it_only(monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    check_class_paths({"model": {"class_path": "tests.toys.ToyLoss"}}, "tests.toys")
    check_class_paths({"model": {"class_path": "medmetric.lightning_modules.metric_pretrain.MetricPretrainModule"}})
    with pytest.raises(UntrustedClassPathError):
        check_class_paths({"model": {"class_path": "tests.toys_evil.ToyLoss"}}, "tests.toys")


def _cli(args: list[str]):
    from medmetric.experiments.cli import main

    return main(args)


def test_cli_refuses_an_untrusted_class_path_before_making_a_run_folder(ham_root, tmp_path, monkeypatch):
    """A real Callback subclass, importable, but from a package outside the allow-list."""
    package = tmp_path / "site" / "shady_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "hooks.py").write_text("from lightning.pytorch.callbacks import Callback\n\nclass Exfiltrate(Callback):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    runs = tmp_path / "runs"
    args = ["fit", "--config", str(REPO / "experiments/ham10000/stage1.yaml"), f"--runs_dir={runs}",
            f"--data.data_dir={ham_root}", "--trainer.callbacks+=shady_pkg.hooks.Exfiltrate"]
    with pytest.raises(UntrustedClassPathError, match=r"--allow_class_paths=shady_pkg or MEDMETRIC_ALLOW_CLASS_PATHS"):
        _cli(args)
    assert not runs.exists() and "shady_pkg.hooks" not in sys.modules  # refused before it was imported
    from medmetric.experiments.cli import MedMetricCLI

    # without main()'s pre-scan, the check of the parsed config still refuses it before instantiation
    with pytest.raises(UntrustedClassPathError, match=r"trainer.callbacks\[0\].class_path names 'shady_pkg"):
        MedMetricCLI(args=args)
    assert not runs.exists()


def test_a_failed_run_is_marked_and_has_no_results(ham_copy, tmp_path):
    image_id = pd.read_csv(ham_copy / HAM_META)["image_id"].iloc[3]
    (ham_copy / "images" / f"{image_id}.jpg").unlink()
    runs = tmp_path / "runs"
    args = ["fit", "--config", str(REPO / "experiments/ham10000/stage1.yaml"), f"--runs_dir={runs}", "--wandb=disabled",
            f"--data.data_dir={ham_copy}", "--data.num_workers=0", "--model.backbone=test_resnet", "--trainer.accelerator=cpu"]
    with pytest.raises(FileNotFoundError, match=image_id):
        _cli(args)
    (run,) = (runs / "default" / "stage1").iterdir()
    assert (run / "FAILED").read_text().startswith("FileNotFoundError: 1 of 300 images")
    assert not list(run.rglob("results*.json"))


# ============================================================================ check-data


def test_check_data_summary_on_synthetic_ham_matches_pandas(ham_copy, capsys):
    meta = pd.read_csv(ham_copy / HAM_META, dtype=str, keep_default_na=False)
    bad = ham_copy / "images" / f"{meta['image_id'].iloc[4]}.jpg"
    bad.write_bytes(bad.read_bytes()[:250])
    code = _cli(["check-data", "--data", "HAM10000", "--data_dir", str(ham_copy)]) if False else check_data.main(
        ["--data", "HAM10000", "--data_dir", str(ham_copy), "--image_size", "64"])
    out = capsys.readouterr().out
    assert code == 1  # an unreadable file is an error
    assert f"images: {len(meta)}   classes: 7" in out
    per_class = meta["dx"].value_counts()
    for cls in ("nv", "df"):
        assert re.search(rf"^{cls}\s+\d+\s+\d+\s+\d+\s+{per_class[cls]}$", out, re.M)
    assert f"lesion groups: {meta['lesion_id'].nunique()} " in out
    assert "lesion groups spanning splits: 0" in out
    assert f"unreadable files: 1\n  {bad.stem}: {bad}: OSError" in out
    assert "image size (width x height): min 80 x 60, max 80 x 60" in out  # synthetic images are 80 x 60
    assert f"images smaller than image_size=64: {len(meta) - 1}" in out


def test_check_data_finds_every_datamodule_by_name():
    names = check_data.datamodule_classes()
    assert names["ham10000"] is HAM10000DataModule and "isic2019" in names
    with pytest.raises(check_data.UsageError, match=r"unknown data set; valid: \["):
        check_data.resolve_class("ham1000")


@pytest.mark.real_data
def test_check_data_on_real_ham10000(capsys):
    root = require_real_ham10000()
    assert check_data.main(["--data", "ham10000", "--data_dir", str(root)]) == 0
    out = capsys.readouterr().out
    meta = pd.read_csv(root / HAM_META)
    assert f"images: {len(meta)}   classes: 7" in out and "lesion groups spanning splits: 0" in out
    assert "unreadable files: 0" in out and "errors: none" in out


def test_check_data_reports_a_leaking_split_file_and_cross_split_duplicates(ham_copy, tmp_path, capsys):
    table = set_up(ham_copy).table.copy()
    sizes = table.groupby("group").size()
    lesion = sizes.index[sizes >= 2][0]
    rows = np.flatnonzero(table["group"].to_numpy() == lesion)
    table.loc[rows[0], "split"], table.loc[rows[1], "split"] = "val", "test"
    split_file = tmp_path / "split.csv"
    write_split_csv(split_file, table)
    before = split_file.read_bytes()
    a, b = table[table["split"] == "train"].iloc[0], table[table["split"] == "test"].iloc[1]
    shutil.copyfile(a["path"], b["path"])
    code = check_data.main(["--data", "ham10000", "--data_dir", str(ham_copy), "--split_file", str(split_file)])
    out = capsys.readouterr().out
    assert code == 1
    assert f"lesion groups spanning splits: 1\n  lesion '{lesion}' in val+test" in out
    assert f"ERROR split file {split_file}: 1 lesions appear in more than one split" in out
    assert "1 sets across splits" in out and f"'{a['image_id']}'" in out and f"'{b['image_id']}'" in out
    assert split_file.read_bytes() == before  # check-data never writes the user's split


def test_a_second_test_of_a_run_is_recorded_apart(tmp_path):
    from types import SimpleNamespace

    from medmetric.callbacks.results import ResultsWriter

    module = SimpleNamespace(test_results={"balanced_accuracy": 0.5}, class_names=["a", "b"], test_confusion=[[1, 0], [0, 1]],
                             test_outputs=None, results_extra={})
    datamodule = SimpleNamespace(class_counts=[3, 2], split_sha256=lambda: "s", fingerprint=lambda: "f" * 64,
                                 split_file=None, data_dir=tmp_path, skipped_images=0)
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), ckpt_path="best.ckpt", datamodule=datamodule)
    writer = ResultsWriter(experiment="x", stage="stage1")
    writer.on_test_end(trainer, module)
    module.test_results = {"balanced_accuracy": 0.9}
    writer.on_test_end(trainer, module)
    first, second = (json.loads((tmp_path / name).read_text()) for name in ("results.json", "results.1.json"))
    assert (first["retest"], first["metrics"]["balanced_accuracy"]) == (False, 0.5)  # the run's result is kept
    assert (second["retest"], second["metrics"]["balanced_accuracy"]) == (True, 0.9)
