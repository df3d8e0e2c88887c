"""``medmetric.experiments.report`` on fake run folders laid out exactly as the framework writes them.

Two configs (CE, lr 0.05, three seeds; SupCon, lr 0.1, two seeds) with fixed random metrics; the
CE runs carry test_outputs.npz (one with embeddings), the SupCon runs none. Numbers are checked
against numpy and a naive per-bin ECE loop, not against the module's own helpers.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.image import imread

from medmetric.experiments import report
from medmetric.experiments.report import main

CLASSES = ["akiec", "bcc", "mel", "nv"]
N_TEST = 80


def fixed_rng(*parts) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32("/".join(map(str, parts)).encode()))


def fake_metrics(rng: np.random.Generator) -> dict:
    metrics = {name: float(rng.uniform(0.3, 0.9)) for name in ("balanced_accuracy", "macro_f1", "accuracy", "macro_auroc")}
    metrics["ece"] = float(rng.uniform(0.01, 0.2))
    metrics.update({f"recall/{c}": float(rng.uniform(0, 1)) for c in CLASSES})
    metrics.update({f"precision/{c}": float(rng.uniform(0, 1)) for c in CLASSES})
    return metrics


def write_run(root: Path, experiment: str, seed: int, *, lr: float, stage: str = "stage2", npz: bool = True,
              embeddings: bool = True, metrics: dict | None = None) -> Path:
    """One run folder: results.json, config.yaml (resolved-CLI shape) and optionally test_outputs.npz."""
    run = root / experiment / stage / f"20260101-12000{seed}"
    run.mkdir(parents=True)
    rng = fixed_rng(experiment, stage, seed)
    results = {
        "experiment": experiment,
        "stage": stage,
        "model": "RebalancedHeadModule",
        "run_dir": str(run.resolve()),
        "checkpoint": str(run / "checkpoints" / "best.ckpt"),
        "class_names": CLASSES,
        "train_class_counts": [40, 60, 120, 900],
        "metrics": metrics if metrics is not None else fake_metrics(rng),
        "confusion_matrix": (rng.integers(0, 6, (4, 4)) + np.diag([20, 15, 10, 30])).tolist(),
    }
    (run / "results.json").write_text(json.dumps(results, indent=2))
    config = {
        "seed_everything": seed,
        "trainer": {"max_epochs": 2, "default_root_dir": str(run), "logger": None, "callbacks": None},
        "model": {
            "class_path": "medmetric.lightning_modules.rebalanced_head.RebalancedHeadModule",
            "init_args": {"handoff": f"{root}/{experiment}/handoff.json", "strategy": "crt", "lr": lr},
        },
        "data": {
            "class_path": "medmetric.datamodules.skin.HAM10000DataModule",
            "init_args": {"data_dir": "data/ham", "split_file": f"{root}/{experiment}/split.csv", "seed": seed, "batch_size": 64},
        },
        "experiment": experiment,
        "runs_dir": str(root),
        "wandb": "auto",
        "wandb_project": "medmetric",
    }
    (run / "config.yaml").write_text("# lightning.pytorch==2.6.6\n" + yaml.safe_dump(config, sort_keys=False))
    if npz:
        targets = rng.integers(0, len(CLASSES), N_TEST)
        logits = rng.normal(size=(N_TEST, len(CLASSES))) * 2 + 2.5 * np.eye(len(CLASSES))[targets]
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        arrays = {"probs": probs.astype(np.float32), "targets": targets.astype(np.int64)}
        if embeddings:
            arrays["embeddings"] = (rng.normal(size=(N_TEST, 8)) + 3 * np.eye(8)[targets]).astype(np.float32)
        # as callbacks/results.py writes it (class_names rides along; the report ignores it)
        np.savez_compressed(run / "test_outputs.npz", class_names=np.asarray(CLASSES), **arrays)
    return run


def fake_runs(root: Path) -> dict[str, list[Path]]:
    ce = [write_run(root, f"ham-ce-seed{s}", s, lr=0.05, embeddings=s == 0) for s in range(3)]
    supcon = [write_run(root, f"ham-supcon-seed{s}", s, lr=0.1, npz=False) for s in range(2)]
    # A re-test writes results.1.json next to results.json: the report must ignore it.
    (ce[1] / "results.1.json").write_text(json.dumps({"metrics": {"balanced_accuracy": 0.0}}))
    # One run without an AUROC (a class absent from its test set): NaN in results.json.
    results = json.loads((supcon[1] / "results.json").read_text())
    results["metrics"]["macro_auroc"] = math.nan
    (supcon[1] / "results.json").write_text(json.dumps(results))
    return {"ham-ce/stage2": ce, "ham-supcon/stage2": supcon}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def metric(run: Path, name: str) -> float:
    return json.loads((run / "results.json").read_text())["metrics"][name]


def naive_ece(probs: np.ndarray, targets: np.ndarray, n_bins: int = 15) -> float:
    confidence, predicted = probs.max(axis=1).astype(np.float64), probs.argmax(axis=1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i in range(len(confidence)) if lo < confidence[i] <= hi or (b == 0 and confidence[i] == 0)]
        if members:
            accuracy = np.mean([predicted[i] == targets[i] for i in members])
            mean_confidence = np.mean([confidence[i] for i in members])
            total += len(members) / len(confidence) * abs(accuracy - mean_confidence)
    return total


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The report over the whole runs folder, built once: (runs root, groups, out, exit code, snapshot)."""
    root = tmp_path_factory.mktemp("runs")
    groups = fake_runs(root)
    before = snapshot(root)
    out = tmp_path_factory.mktemp("reports") / "ham"
    code = main([str(root), "--out", str(out)])
    return root, groups, out, code, before


@pytest.fixture(scope="module")
def table(built) -> pd.DataFrame:
    return pd.read_csv(built[2] / "report.csv").set_index("group")


def test_report_files_and_valid_pngs(built):
    _, _, out, code, _ = built
    assert code == 0
    assert (out / "report.md").is_file() and (out / "report.csv").is_file()
    expected = ["per_class_recall.png", "confusion_ham-ce_stage2.png", "confusion_ham-supcon_stage2.png",
                "reliability_ham-ce_stage2.png", "embedding_ham-ce_stage2.png"]
    for name in expected:
        image = imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name
    markdown = (out / "report.md").read_text()
    assert all(f"]({name})" in markdown for name in expected)


def test_csv_mean_std_match_numpy(built, table):
    _, groups, _, _, _ = built
    assert set(table.index) == set(groups)
    for label, runs in groups.items():
        values = [metric(run, "balanced_accuracy") for run in runs]
        assert table.loc[label, "n_runs"] == len(runs)
        assert table.loc[label, "balanced_accuracy_mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert table.loc[label, "balanced_accuracy_std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        recall = [metric(run, "recall/mel") for run in runs]
        assert table.loc[label, "recall/mel_mean"] == pytest.approx(np.mean(recall), abs=1e-12)
    assert table.loc["ham-ce/stage2", "seeds"] == "0, 1, 2"


def test_markdown_shows_mean_pm_std_and_training_counts(built):
    _, groups, out, _, _ = built
    markdown = (out / "report.md").read_text()
    values = [metric(run, "macro_f1") for run in groups["ham-ce/stage2"]]
    assert f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" in markdown
    assert "akiec 40, bcc 60, mel 120, nv 900" in markdown
    for runs in groups.values():
        assert all(run.as_posix() in markdown for run in runs)


def test_nan_metric_is_left_out_and_flagged(built, table):
    _, groups, out, _, _ = built
    first = metric(groups["ham-supcon/stage2"][0], "macro_auroc")
    assert table.loc["ham-supcon/stage2", "macro_auroc_mean"] == pytest.approx(first)
    assert math.isnan(table.loc["ham-supcon/stage2", "macro_auroc_std"])
    assert f"{first:.3f} (1/2)" in (out / "report.md").read_text()


def test_reliability_ece_matches_naive_loop(built, table):
    _, groups, out, _, _ = built
    markdown = (out / "report.md").read_text()
    eces = []
    for run in groups["ham-ce/stage2"]:
        with np.load(run / "test_outputs.npz") as npz:
            eces.append(naive_ece(npz["probs"], npz["targets"]))
        assert f"{eces[-1]:.4f}" in markdown
    assert table.loc["ham-ce/stage2", "ece_15bin_mean"] == pytest.approx(np.mean(eces), abs=1e-12)
    assert table.loc["ham-ce/stage2", "ece_15bin_std"] == pytest.approx(np.std(eces, ddof=1), abs=1e-12)


def test_reliability_bins_put_edges_in_the_lower_bin():
    probs = np.array([[1.0, 0.0], [0.5, 0.5], [0.75, 0.25]])
    calibration = report.reliability_bins(probs, np.array([0, 1, 0]), n_bins=4)
    assert calibration.count.tolist() == [0, 1, 1, 1]  # 0.5 -> (0.25, 0.5], 0.75 -> (0.5, 0.75]
    assert calibration.ece == pytest.approx(naive_ece(probs, np.array([0, 1, 0]), n_bins=4))


def test_missing_npz_skips_figures_with_a_note(built, table):
    _, _, out, _, _ = built
    assert not list(out.glob("reliability_ham-supcon*")) and not list(out.glob("embedding_ham-supcon*"))
    assert math.isnan(table.loc["ham-supcon/stage2", "ece_15bin_mean"])
    markdown = (out / "report.md").read_text()
    assert "skipped: no run in this group has a (usable) test_outputs.npz" in markdown


def test_retest_results_are_ignored_and_runs_untouched(built):
    root, _, out, _, before = built
    assert snapshot(root) == before
    assert "results.<n>.json); reported results.json only" in (out / "report.md").read_text()


def test_seeds_merge_and_different_configs_split(tmp_path):
    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run(root, f"abl-seed{seed}", seed, lr=0.05, npz=False)
    write_run(root, "abl_seed2", 2, lr=0.2, npz=False)
    write_run(root, "abl-seed0", 0, lr=0.05, stage="stage1", npz=False)
    assert main([str(root), "--out", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "report.csv").set_index("group")
    assert table["n_runs"].to_dict() == {"abl/stage1": 1, "abl/stage2 [model.lr=0.05]": 2, "abl/stage2 [model.lr=0.2]": 1}
    assert math.isnan(table.loc["abl/stage2 [model.lr=0.2]", "balanced_accuracy_std"])
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert 'the runs labelled "abl/stage2" have 2 different configs' in markdown
    single = metric(root / "abl_seed2" / "stage2" / "20260101-120002", "balanced_accuracy")
    assert f"| {single:.3f} |" in markdown  # one run: the mean alone, no ±
    assert (tmp_path / "out" / "confusion_abl_stage2_model.lr_0.2.png").is_file()


def test_labels_from_globs(built, tmp_path):
    root, groups, _, _, _ = built
    out = tmp_path / "out"
    code = main([f"{root}/ham-*-seed*/stage2/*", "--out", str(out), "--label", "CE=*ham-ce-seed*",
                 "--label", f"SupCon={root}/ham-supcon-seed*", "--label", "unused=*nothing*"])
    assert code == 0
    table = pd.read_csv(out / "report.csv").set_index("group")
    assert table["n_runs"].to_dict() == {"CE": 3, "SupCon": 2}
    assert (out / "confusion_CE.png").is_file() and (out / "reliability_CE.png").is_file()
    assert "--label unused=*nothing* matched no run" in (out / "report.md").read_text()


@pytest.mark.parametrize("make_input", [
    lambda tmp: tmp / "no-such-run",
    lambda tmp: tmp / "runs" / "missing-*",
    lambda tmp: tmp / "empty",
])
def test_bad_path_exits_2_and_names_it(tmp_path, capsys, make_input):
    (tmp_path / "empty").mkdir()
    bad = str(make_input(tmp_path))
    assert main([bad, "--out", str(tmp_path / "out")]) == 2
    assert bad in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_corrupt_results_json_names_the_file(tmp_path, capsys):
    run = write_run(tmp_path / "runs", "bad", 0, lr=0.1, npz=False)
    (run / "results.json").write_text('{"metrics": {')
    assert main([str(run), "--out", str(tmp_path / "out")]) == 2
    assert str(run / "results.json") in capsys.readouterr().err


def test_refuses_to_overwrite_without_flag(tmp_path, capsys):
    run = write_run(tmp_path / "runs", "one", 0, lr=0.1, npz=False)
    out = tmp_path / "out"
    assert main([str(run), "--out", str(out)]) == 0
    written = (out / "report.md").stat().st_mtime_ns
    assert main([str(run), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "report.md").stat().st_mtime_ns == written
    assert main([str(run), "--out", str(out), "--overwrite"]) == 0


def test_refuses_out_inside_a_run_folder(tmp_path, capsys):
    run = write_run(tmp_path / "runs", "one", 0, lr=0.1, npz=False)
    assert main([str(run), "--out", str(run / "report")]) == 2
    assert "inside the run folder" in capsys.readouterr().err
    assert not (run / "report").exists()


def test_pca_projection_keeps_the_main_axis():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(200, 5)) * np.array([10.0, 1, 1, 1, 1])
    projected, how = report.project_2d(points)
    assert how == "PCA" and projected.shape == (200, 2)
    assert abs(np.corrcoef(projected[:, 0], points[:, 0])[0, 1]) > 0.99
    assert report.project_2d(points[:, :1])[0].shape == (200, 2)


def test_wandb_offline_logs_a_report_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = write_run(tmp_path / "runs", "one", 0, lr=0.1)
    assert main([str(run), "--out", str(tmp_path / "out"), "--wandb", "offline", "--wandb_project", "test"]) == 0
    assert list((tmp_path / "wandb").glob("offline-run-*"))
