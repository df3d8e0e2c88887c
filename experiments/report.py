"""Publishable report over finished runs: seeds pooled per config, mean ± std, figures, W&B.

    python -m medmetric.experiments.report 'runs/ham-ce-seed*/stage2/*' runs/ham-supcon --out reports/ham
    python -m medmetric.experiments.report runs --out reports/all --label CE='*ham-ce*' --label SupCon='*supcon*'

Why: a single run's balanced accuracy on a class-imbalanced test set moves by a few points from
seed to seed, so the numbers worth publishing are mean ± std over seeds of *one* config. This
module finds the run folders (``results.json``, ``config.yaml``, optional ``test_outputs.npz``),
groups them by label and by config, and writes into ``--out``:

    report.md                  summary table (mean ± std), per-class recall, every run per group,
                               training class counts, notes on anything skipped or split
    report.csv                 the same numbers, one row per group, separate mean/std columns
    per_class_recall.png       grouped bars: classes on x, one bar per group, std over seeds
    confusion_<group>.png      row-normalised confusion matrix of the group's first run
    reliability_<group>.png    15-bin reliability diagram from test_outputs.npz (ECE in title)
    embedding_<group>.png      2-D projection (PCA, or t-SNE) of the test embeddings

Grouping: runs are the same config when their ``config.yaml`` are equal once the run-specific
keys (``RUN_SPECIFIC_KEYS``: seeds, paths, logging) are removed. The group label is
``--label NAME=GLOB`` for runs whose path matches GLOB, else the experiment name without a
trailing ``-seed<N>``/``_seed<N>`` plus the stage ("ham-ce/stage2"). A label holding several
configs is split, and each part is named after the config keys that differ.

Only ``results.json`` is read (a re-test's ``results.1.json`` is ignored), the run folders are
never written to, and existing report files are kept unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import glob
import json
import math
import os
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib import colormaps
from matplotlib.figure import Figure  # object API: renders with Agg, no pyplot global state

HEADLINE_METRICS = (
    "balanced_accuracy",
    "macro_f1",
    "accuracy",
    "macro_auroc",
    "ece",
    "many_shot_accuracy",
    "medium_shot_accuracy",
    "few_shot_accuracy",
)
NPZ_ECE = "ece_15bin"  # ECE recomputed from test_outputs.npz with the reliability diagram's bins
N_BINS = 15
RUN_SPECIFIC_KEYS = (
    "seed_everything",
    "experiment",
    "runs_dir",
    "trainer.default_root_dir",
    "data.init_args.split_file",
    "data.init_args.seed",
    "model.init_args.handoff",
    "wandb",
    "wandb_project",
    "trainer.logger",
    "trainer.callbacks",
)
REQUIRED_RESULT_KEYS = ("metrics", "class_names", "confusion_matrix")
SEED_SUFFIX = re.compile(r"[-_]seed(\d+)$")
TSNE_MAX_POINTS = 3000
from medmetric.experiments.wandb_mode import WANDB_MODES, wandb_offline  # noqa: E402


class ReportError(Exception):
    """A problem with the inputs or --out the user can fix: printed to stderr, exit code 2."""


# --- runs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """Per-bin accuracy, mean confidence and count over equal-width confidence bins."""

    accuracy: np.ndarray
    confidence: np.ndarray
    count: np.ndarray
    ece: float


@dataclass
class Run:
    path: Path  # as found (relative when the input was)
    results: dict
    config: dict | None
    calibration: Calibration | None = None
    has_embeddings: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.as_posix()

    @property
    def metrics(self) -> dict:
        return self.results["metrics"]

    @property
    def class_names(self) -> list[str]:
        return list(self.results["class_names"])

    @property
    def npz_path(self) -> Path:
        return self.path / "test_outputs.npz"

    @property
    def experiment(self) -> str:
        name = self.results.get("experiment") or (self.config or {}).get("experiment")
        return str(name or self.path.name)

    @property
    def seed(self) -> int | None:
        seed = (self.config or {}).get("seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool):
            return seed
        match = SEED_SUFFIX.search(self.experiment)
        return int(match.group(1)) if match else None

    def default_label(self) -> str:
        base = SEED_SUFFIX.sub("", self.experiment)
        stage = self.results.get("stage")
        return f"{base}/{stage}" if stage else base


@dataclass
class Group:
    label: str
    runs: list[Run]
    slug: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def first(self) -> Run:
        return self.runs[0]


def has_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def discover_runs(inputs: list[str]) -> list[Path]:
    """Run folders (holding results.json) named by, matched by, or below each input."""
    found: dict[Path, Path] = {}
    for item in inputs:
        if has_glob(item):
            matches = [Path(p) for p in sorted(glob.glob(item, recursive=True))]
            if not matches:
                raise ReportError(f"{item}: the pattern matches no path; check it (and quote it so the shell does not expand it)")
        elif Path(item).exists():
            matches = [Path(item)]
        else:
            raise ReportError(f"{item}: no such file or folder; pass run folders (runs/<experiment>/<stage>/<timestamp>) or a folder above them")
        runs = [run for match in matches for run in runs_at(match)]
        if not runs:
            raise ReportError(f"{item}: no results.json in it or below it; pass run folders that finished testing (they hold results.json) or a folder above them")
        for run in runs:
            found.setdefault(run.resolve(), run)
    return sorted(found.values(), key=lambda p: p.as_posix())


def runs_at(path: Path) -> list[Path]:
    if path.is_file():
        return [path.parent] if path.name == "results.json" else []
    if (path / "results.json").is_file():
        return [path]
    return sorted({p.parent for p in path.rglob("results.json")}, key=lambda p: p.as_posix())


def load_run(path: Path) -> Run:
    results_file = path / "results.json"
    try:
        results = json.loads(results_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReportError(f"{results_file}: cannot read it ({error}); test the run again or leave it out") from error
    missing = [key for key in REQUIRED_RESULT_KEYS if not isinstance(results, dict) or key not in results]
    if missing:
        raise ReportError(f"{results_file}: not a medmetric results file (missing {', '.join(missing)})")
    run = Run(path=path, results=results, config=load_config(path))
    if run.config is None:
        run.notes.append(f"{path}: no config.yaml; grouped with the other runs of its label that lack one")
    if sorted(path.glob("results.*.json")):
        run.notes.append(f"{path}: has re-test results (results.<n>.json); reported results.json only")
    load_outputs(run)
    return run


def load_config(path: Path) -> dict | None:
    config_file = path / "config.yaml"
    if not config_file.is_file():
        return None
    try:
        config = yaml.safe_load(config_file.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ReportError(f"{config_file}: cannot parse it ({error})") from error
    return config if isinstance(config, dict) else {}


def read_outputs(run: Run) -> dict[str, np.ndarray]:
    """probs (N, C), targets (N,) and, when saved, embeddings (N, D); ValueError when unusable."""
    try:
        with np.load(run.npz_path) as npz:
            outputs = {key: np.asarray(npz[key]) for key in ("probs", "targets", "embeddings") if key in npz.files}
    except Exception as error:  # zip/format errors: reported as a note, the report goes on
        raise ValueError(str(error) or type(error).__name__) from error
    if "probs" not in outputs or "targets" not in outputs:
        raise ValueError("needs arrays 'probs' and 'targets'")
    probs, targets = outputs["probs"], outputs["targets"]
    n_classes = len(run.class_names)
    if probs.ndim != 2 or probs.shape[1] != n_classes or targets.shape != (len(probs),) or not len(probs):
        raise ValueError(f"probs {probs.shape} and targets {targets.shape} do not fit {n_classes} classes")
    if "embeddings" in outputs and len(outputs["embeddings"]) != len(probs):
        raise ValueError(f"embeddings {outputs['embeddings'].shape} do not match {len(probs)} samples")
    return outputs


def load_outputs(run: Run) -> None:
    """Attach the run's calibration bins (from test_outputs.npz) or a note saying why not."""
    if not run.npz_path.is_file():
        return
    try:
        outputs = read_outputs(run)
    except ValueError as error:
        run.notes.append(f"{run.npz_path}: unusable ({error}); its figures and {NPZ_ECE} are skipped")
        return
    run.calibration = reliability_bins(outputs["probs"], outputs["targets"])
    run.has_embeddings = "embeddings" in outputs


# --- grouping --------------------------------------------------------------------------------
def strip_run_specific(config: dict | None) -> dict | None:
    if config is None:
        return None
    config = copy.deepcopy(config)
    for dotted in RUN_SPECIFIC_KEYS:
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return config


def config_key(config: dict | None) -> str:
    return json.dumps(strip_run_specific(config), sort_keys=True, default=str)


def matches_label(path: Path, pattern: str) -> bool:
    """fnmatch (``*`` crosses ``/``) on the run path, or on a folder above it when GLOB names one."""
    if os.path.isabs(pattern):
        candidates = [path.resolve().as_posix()]
    else:
        candidates = [path.as_posix(), Path(os.path.relpath(path.resolve())).as_posix()]
    pattern = pattern.rstrip("/") or "/"
    return any(fnmatch.fnmatchcase(c, p) for c in candidates for p in (pattern, pattern + "/*"))


def parse_label(spec: str) -> tuple[str, str]:
    name, sep, pattern = spec.partition("=")
    if not sep or not name.strip() or not pattern.strip():
        raise argparse.ArgumentTypeError(f"{spec!r}: expected NAME=GLOB, e.g. CE='runs/ham-ce-seed*'")
    return name.strip(), pattern.strip()


def label_of(run: Run, labels: list[tuple[str, str]]) -> str:
    for name, pattern in labels:
        if matches_label(run.path, pattern):
            return name
    return run.default_label()


def run_order(run: Run) -> tuple:
    return (run.seed is None, run.seed if run.seed is not None else 0, run.name)


def make_groups(runs: list[Run], labels: list[tuple[str, str]]) -> list[Group]:
    """Group by label, then split a label whose runs differ in config (run-specific keys aside)."""
    by_label: dict[str, dict[str, list[Run]]] = {}
    for run in runs:
        by_label.setdefault(label_of(run, labels), {}).setdefault(config_key(run.config), []).append(run)
    groups = []
    for label, by_config in sorted(by_label.items()):
        parts = [sorted(part, key=run_order) for part in by_config.values()]
        if len(parts) == 1:
            groups.append(Group(label, parts[0]))
            continue
        suffixes = describe_differences([part[0].config for part in parts])
        split = [Group(f"{label} [{suffix}]", part) for suffix, part in zip(suffixes, parts, strict=True)]
        names = ", ".join(f'"{g.label}"' for g in split)
        for group in split:
            group.notes.append(f'the runs labelled "{label}" have {len(parts)} different configs; split into {names}')
        groups.extend(sorted(split, key=lambda g: g.label))
    assign_slugs(groups)
    for group in groups:
        note_duplicate_seeds(group)
    return groups


def flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree} if prefix else {}


def describe_differences(configs: list[dict | None], max_keys: int = 2) -> list[str]:
    """A short, unique name per config from the keys on which they differ ("model.lr=0.05")."""
    flats = [flatten(strip_run_specific(c)) if c is not None else None for c in configs]
    present = [f for f in flats if f is not None]
    keys = sorted(set().union(*present)) if present else []
    differing = [k for k in keys if len({json.dumps(f.get(k, "<unset>"), default=str) for f in present}) > 1]
    names = []
    for flat in flats:
        if flat is None:
            names.append("no config.yaml")
            continue
        parts = [f"{k.replace('.init_args.', '.')}={short_value(flat.get(k, '<unset>'))}" for k in differing[:max_keys]]
        names.append(", ".join(parts) + (", ..." if len(differing) > max_keys else ""))
    if len(set(names)) < len(names):
        names = [f"{name}; config {i + 1}" if name else f"config {i + 1}" for i, name in enumerate(names)]
    return names


def short_value(value, width: int = 24) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def assign_slugs(groups: list[Group]) -> None:
    """File-name-safe, unique group names ("ham-ce/stage2" -> "ham-ce_stage2")."""
    used: set[str] = set()
    for group in groups:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", group.label).strip("_.") or "group"
        slug, n = base, 1
        while slug.lower() in used:
            n += 1
            slug = f"{base}_{n}"
        used.add(slug.lower())
        group.slug = slug


def note_duplicate_seeds(group: Group) -> None:
    seeds = [run.seed for run in group.runs if run.seed is not None]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        group.notes.append(f"seed(s) {', '.join(map(str, repeated))} appear more than once; every repeat counts as a run")


# --- numbers ---------------------------------------------------------------------------------
def reliability_bins(probs: np.ndarray, targets: np.ndarray, n_bins: int = N_BINS) -> Calibration:
    """Equal-width confidence bins (lo, hi] over [0, 1]; ECE = sum_b n_b/N |acc_b - conf_b|."""
    confidence = np.asarray(probs, dtype=np.float64).max(axis=1)
    correct = (np.asarray(probs).argmax(axis=1) == np.asarray(targets)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(index, weights=correct, minlength=n_bins) / count
        mean_confidence = np.bincount(index, weights=confidence, minlength=n_bins) / count
    filled = count > 0
    ece = float(np.sum(count[filled] / count.sum() * np.abs(accuracy[filled] - mean_confidence[filled])))
    return Calibration(accuracy, mean_confidence, count, ece if len(confidence) else math.nan)


def run_value(run: Run, metric: str) -> float:
    if metric == NPZ_ECE:
        return run.calibration.ece if run.calibration else math.nan
    value = run.metrics.get(metric)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean and std (ddof=1) over the finite values, and how many there were."""
    finite = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
    if len(finite) == 0:
        return math.nan, math.nan, 0
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    return float(np.mean(finite)), std, len(finite)


def table_metrics(runs: list[Run]) -> list[str]:
    """Headline metrics present in any run, then the npz ECE when any run has test outputs."""
    present = [m for m in HEADLINE_METRICS if any(m in run.metrics for run in runs)]
    return present + ([NPZ_ECE] if any(run.calibration for run in runs) else [])


def all_classes(groups: list[Group]) -> list[str]:
    classes: list[str] = []
    for group in groups:
        classes += [c for c in group.first.class_names if c not in classes]
    return classes


def summary_frame(groups: list[Group], metrics: list[str], classes: list[str]) -> pd.DataFrame:
    rows = []
    for group in groups:
        row = {"group": group.label, "n_runs": len(group.runs), "seeds": seeds_text(group)}
        for metric in metrics + [f"recall/{c}" for c in classes]:
            mean, std, _ = mean_std([run_value(run, metric) for run in group.runs])
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean, std
        row["run_dirs"] = "; ".join(run.name for run in group.runs)
        rows.append(row)
    return pd.DataFrame(rows)


def seeds_text(group: Group) -> str:
    return ", ".join("?" if run.seed is None else str(run.seed) for run in group.runs)


# --- figures ---------------------------------------------------------------------------------
FigurePlan = list[tuple[str, Callable[[], Figure]]]  # (file name, draw) pairs


def plan_figures(groups: list[Group], classes: list[str], embedding: str) -> tuple[FigurePlan, dict[str, list[str]]]:
    """Which figures to draw, and per group a caption line for each (or why one is missing)."""
    plan: FigurePlan = [("per_class_recall.png", lambda: per_class_recall_figure(groups, classes))]
    captions: dict[str, list[str]] = {}
    for group in groups:
        lines = captions.setdefault(group.label, [])
        first = group.first
        if first.results.get("confusion_matrix"):
            name = f"confusion_{group.slug}.png"
            plan.append((name, lambda g=group: confusion_figure(g)))
            lines.append(f"![confusion {group.label}]({name}) confusion matrix, rows normalised (run {first.name})")
        else:
            lines.append(f"confusion matrix skipped: {first.name}/results.json has none")
        calibrated = next((run for run in group.runs if run.calibration), None)
        note_missing_outputs(group)
        if calibrated is None:
            lines.append(f"reliability diagram, embedding and {NPZ_ECE} skipped: no run in this group "
                         "has a (usable) test_outputs.npz")
            continue
        name = f"reliability_{group.slug}.png"
        plan.append((name, lambda g=group, r=calibrated: reliability_figure(g, r)))
        lines.append(f"![reliability {group.label}]({name}) reliability diagram, {N_BINS} bins, "
                     f"{NPZ_ECE} = {calibrated.calibration.ece:.4f} (run {calibrated.name})")
        embedded = next((run for run in group.runs if run.has_embeddings), None)
        if embedded is None:
            lines.append("embedding figure skipped: no test_outputs.npz in this group holds embeddings")
            continue
        name = f"embedding_{group.slug}.png"
        plan.append((name, lambda g=group, r=embedded: embedding_figure(g, r, embedding)))
        lines.append(f"![embedding {group.label}]({name}) test embeddings, 2-D projection (run {embedded.name})")
    return plan, captions


def note_missing_outputs(group: Group) -> None:
    missing = [run for run in group.runs if not run.npz_path.is_file()]
    if missing and len(missing) < len(group.runs):
        names = ", ".join(run.name for run in missing)
        group.notes.append(f"test_outputs.npz missing in {len(missing)} of {len(group.runs)} runs ({names}); "
                           f"{NPZ_ECE} is over the others")


def figure_size(n_classes: int) -> tuple[float, float]:
    side = min(4.0 + 0.6 * n_classes, 14.0)
    return side, side * 0.85


def confusion_figure(group: Group) -> Figure:
    run = group.first
    matrix = np.asarray(run.results["confusion_matrix"], dtype=np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    names = run.class_names
    fig = Figure(figsize=figure_size(len(names)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of true class")
    fontsize = 8 if len(names) <= 12 else 6
    for (i, j), value in np.ndenumerate(normalised):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=fontsize,
                color="white" if value > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{group.label}\n{run.path.name}", fontsize=10)
    return fig


def per_class_recall_figure(groups: list[Group], classes: list[str]) -> Figure:
    fig = Figure(figsize=(max(6.0, 1.0 + 0.5 * len(classes) * max(1, len(groups)) ** 0.5), 4.5), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(len(groups), 1)
    x = np.arange(len(classes))
    for i, group in enumerate(groups):
        stats = [mean_std([run_value(run, f"recall/{c}") for run in group.runs]) for c in classes]
        means = np.array([s[0] for s in stats])
        stds = np.array([s[1] for s in stats])
        yerr = np.nan_to_num(stds) if np.isfinite(stds).any() else None  # one run: no error bar
        ax.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(means), width, yerr=yerr, capsize=2,
               label=f"{group.label} (n={len(group.runs)})")
    ax.set_xticks(x, classes, rotation=45, ha="right")
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("test recall (mean ± std over runs)")
    ax.set_title("Per-class recall")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def reliability_figure(group: Group, run: Run) -> Figure:
    calibration = run.calibration
    edges = np.linspace(0.0, 1.0, N_BINS + 1)
    filled = calibration.count > 0
    fig = Figure(figsize=(4.8, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(edges[:-1][filled], calibration.accuracy[filled], width=1.0 / N_BINS, align="edge",
           edgecolor="black", linewidth=0.5, label="accuracy")
    gap = calibration.confidence[filled] - calibration.accuracy[filled]
    ax.bar(edges[:-1][filled], gap, bottom=calibration.accuracy[filled], width=1.0 / N_BINS, align="edge",
           color="tab:red", alpha=0.3, edgecolor="tab:red", label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max softmax probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{group.label}\nECE ({N_BINS} bins) = {calibration.ece:.4f}, {run.path.name}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    return fig


def project_2d(embeddings: np.ndarray, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, 2) projection and its name: t-SNE when asked and N <= TSNE_MAX_POINTS, else PCA."""
    x = np.asarray(embeddings, dtype=np.float64).reshape(len(embeddings), -1)
    if method == "tsne" and 3 < len(x) <= TSNE_MAX_POINTS:
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (len(x) - 1) / 3)
        return TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x), "t-SNE"
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ vt[:2].T
    if projected.shape[1] < 2:
        projected = np.pad(projected, ((0, 0), (0, 2 - projected.shape[1])))
    suffix = f" (t-SNE needs N <= {TSNE_MAX_POINTS})" if method == "tsne" else ""
    return projected, "PCA" + suffix


def embedding_figure(group: Group, run: Run, method: str) -> Figure:
    outputs = read_outputs(run)
    points, how = project_2d(outputs["embeddings"], method)
    names = run.class_names
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    fig = Figure(figsize=(6.0, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for index, name in enumerate(names):
        mask = outputs["targets"] == index
        if mask.any():
            ax.scatter(points[mask, 0], points[mask, 1], s=8, alpha=0.7, color=cmap(index % cmap.N),
                       label=f"{name} ({int(mask.sum())})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{group.label}: test embeddings, {how}\n{run.path.name}", fontsize=10)
    ax.legend(fontsize=7, markerscale=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def draw_figures(plan: FigurePlan, out: Path) -> list[str]:
    written = []
    for name, draw in plan:
        draw().savefig(out / name, dpi=120)
        written.append(name)
    return written


# --- markdown --------------------------------------------------------------------------------
def cell(values: list[float], digits: int = 3) -> str:
    """"0.512 ± 0.013"; mean only for one value; "(2/3)" when some runs have no value."""
    mean, std, n = mean_std(values)
    if n == 0:
        return "n/a"
    text = f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"
    return text if n == len(values) else f"{text} ({n}/{len(values)})"


def md_row(cells: list) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def md_table(head: list[str], rows: list[list]) -> list[str]:
    return [md_row(head), "|" + "---|" * len(head), *(md_row(row) for row in rows)]


def group_section(group: Group, metrics: list[str], captions: list[str]) -> list[str]:
    first = group.first
    config = first.config or {}
    classes = (config.get("model") or {}).get("class_path"), (config.get("data") or {}).get("class_path")
    lines = [f"### {group.label}", ""]
    if any(classes):
        lines += [f"Model `{classes[0]}`, data `{classes[1]}`.", ""]
    counts = first.results.get("train_class_counts")
    if counts:
        pairs = ", ".join(f"{c} {n}" for c, n in zip(first.class_names, counts, strict=False))
        lines += [f"Training images per class: {pairs} (total {sum(counts)}).", ""]
        if any(run.results.get("train_class_counts") != counts for run in group.runs):
            group.notes.append("training class counts differ between the runs (counts above: first run)")
    else:
        lines += ["Training images per class: not recorded.", ""]
    columns = [m for m in ("balanced_accuracy", "macro_f1", NPZ_ECE) if m in metrics]
    rows = [[f"`{run.name}`", "?" if run.seed is None else run.seed]
            + [fmt(run_value(run, m), 4) for m in columns] for run in group.runs]
    lines += md_table(["run folder", "seed", *columns], rows) + [""]
    lines += [f"- {caption}" for caption in captions]
    lines += [f"- note: {note}" for note in group.notes + [n for run in group.runs for n in run.notes]]
    return lines + [""]


def fmt(value: float, digits: int = 3) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def markdown_report(groups: list[Group], metrics: list[str], classes: list[str],
                    captions: dict[str, list[str]], notes: list[str], command: str) -> str:
    n_runs = sum(len(g.runs) for g in groups)
    lines = [
        "# medmetric report", "",
        f"{n_runs} runs in {len(groups)} groups. Each cell: mean ± std over a group's runs (std with "
        "ddof=1; one run: mean only; \"(k/n)\": only k of n runs have the value). Runs in a group share "
        f"one config apart from seeds, paths and logging. `{NPZ_ECE}`: expected calibration error from "
        f"test_outputs.npz over {N_BINS} equal-width confidence bins, as in the reliability diagrams.", "",
        f"Command: `{command}`", "",
        "## Summary", "",
    ]
    rows = [[g.label, len(g.runs), seeds_text(g)] + [cell([run_value(r, m) for r in g.runs]) for m in metrics]
            for g in groups]
    lines += md_table(["group", "n_runs", "seeds", *metrics], rows) + ["", "## Per-class recall", ""]
    rows = [[g.label] + [cell([run_value(r, f"recall/{c}") for r in g.runs]) for c in classes] for g in groups]
    lines += md_table(["group", *classes], rows)
    lines += ["", "![per-class recall](per_class_recall.png)", "", "## Groups", ""]
    for group in groups:
        lines += group_section(group, metrics, captions.get(group.label, []))
    if notes:
        lines += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    return "\n".join(lines)


# --- W&B -------------------------------------------------------------------------------------
def log_to_wandb(mode: str, project: str, frame: pd.DataFrame, figures: list[str], out: Path, inputs: list[str]) -> str:
    """One ``job_type="report"`` run with the summary table and every figure; returns where it went."""
    import wandb

    mode = "offline" if wandb_offline(mode) else "online"
    run = wandb.init(project=project, job_type="report", mode=mode, name=f"report-{out.name}",
                     dir=os.environ.get("WANDB_DIR") or str(out), config={"inputs": inputs, "out": str(out)})
    table = frame.astype(object).where(frame.notna(), None)
    payload = {"report/summary": wandb.Table(dataframe=table)}
    payload.update({f"report/{Path(name).stem}": wandb.Image(str(out / name)) for name in figures})
    run.log(payload)
    where = run.url if mode == "online" else getattr(run, "dir", "")
    run.finish()
    wandb.teardown()  # leave no global W&B state behind for later runs in this process
    return f"W&B ({mode}): {where}"


# --- command line ----------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m medmetric.experiments.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="RUN", help="run folder, glob, or a folder above run folders")
    parser.add_argument("--out", required=True, type=Path, help="report folder (created)")
    parser.add_argument("--label", action="append", default=[], type=parse_label, metavar="NAME=GLOB",
                        help="name the runs whose path (or a folder above it) matches GLOB; repeatable, first match wins")
    parser.add_argument("--overwrite", action="store_true", help="replace report files already in --out")
    parser.add_argument("--embedding", choices=("pca", "tsne"), default="pca",
                        help=f"2-D projection of the embeddings (t-SNE only up to {TSNE_MAX_POINTS} points)")
    parser.add_argument("--wandb", choices=WANDB_MODES, default="auto",
                        help="also log figures and table to W&B (online falls back to offline without a key)")
    parser.add_argument("--wandb_project", default="medmetric")
    parser.add_argument("--allow_fingerprint_mismatch", action="store_true",
                        help="aggregate runs on the same classes whose dataset fingerprints differ (refused by default)")
    return parser.parse_args(argv)


def check_out(out: Path, files: list[str], runs: list[Run], overwrite: bool) -> None:
    target = out.resolve()
    for run in runs:
        folder = run.path.resolve()
        if target == folder or folder in target.parents:
            raise ReportError(f"--out {out}: inside the run folder {run.path}; the report never writes into runs, choose e.g. reports/<name>")
    existing = [name for name in files if (out / name).exists()]
    if existing and not overwrite:
        shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
        raise ReportError(f"{out}: already holds {shown}; pass --overwrite to replace them, or choose another --out")


def check_same_data(runs: list[Run]) -> None:
    """Refuse runs on the same class list whose dataset fingerprints differ (other files/labels/split)."""
    by_classes: dict[tuple, dict[str, list[str]]] = {}
    for run in runs:
        fingerprint = run.results.get("dataset_fingerprint")
        if fingerprint:
            by_classes.setdefault(tuple(run.class_names), {}).setdefault(fingerprint, []).append(run.name)
    for prints in by_classes.values():
        if len(prints) > 1:
            shown = "; ".join(f"{fp[:12]}: {', '.join(names[:3])}" + (" ..." if len(names) > 3 else "")
                              for fp, names in prints.items())
            raise ReportError(
                f"runs on the same classes were made on different data (dataset fingerprints {shown}); their "
                "numbers are not comparable. Report them separately, or pass --allow_fingerprint_mismatch to "
                "aggregate them knowingly"
            )


def label_notes(labels: list[tuple[str, str]], runs: list[Run]) -> list[str]:
    return [f"--label {name}={pattern} matched no run" for name, pattern in labels
            if not any(matches_label(run.path, pattern) for run in runs)]


def build_report(args: argparse.Namespace, command: str) -> str:
    runs = [load_run(path) for path in discover_runs(args.inputs)]
    if not getattr(args, "allow_fingerprint_mismatch", False):
        check_same_data(runs)
    groups = make_groups(runs, args.label)
    metrics, classes = table_metrics(runs), all_classes(groups)
    plan, captions = plan_figures(groups, classes, args.embedding)
    check_out(args.out, ["report.md", "report.csv"] + [name for name, _ in plan], runs, args.overwrite)
    if wandb_offline(args.wandb) is not None:
        try:
            import wandb  # noqa: F401
        except ImportError as error:
            raise ReportError(f"--wandb {args.wandb}: wandb is not importable ({error}); install it or use --wandb disabled") from error
    args.out.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(plan, args.out)
    frame = summary_frame(groups, metrics, classes)
    frame.to_csv(args.out / "report.csv", index=False, na_rep="")
    notes = label_notes(args.label, runs)
    (args.out / "report.md").write_text(markdown_report(groups, metrics, classes, captions, notes, command))
    summary = f"report: {len(runs)} runs in {len(groups)} groups -> {args.out / 'report.md'}, report.csv, {len(figures)} figures"
    if wandb_offline(args.wandb) is not None:
        summary += "\n" + log_to_wandb(args.wandb, args.wandb_project, frame, figures, args.out, args.inputs)
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m medmetric.experiments.report RUN... --out DIR``: 0 on success, 2 on a usage problem."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        summary = build_report(args, "python -m medmetric.experiments.report " + shlex.join(argv))
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
