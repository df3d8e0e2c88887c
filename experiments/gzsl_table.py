"""Synthetic generalised zero-shot (GZSL) table: seen / unseen / harmonic test AUROC.

    python -m medmetric.experiments.gzsl_table --seeds 0 1 --control   # the README table: ~30 min on 2 busy CPU cores
    python -m medmetric.experiments.gzsl_table --epochs 3 --n_patients 200 --rows cm_wfe   # ~2 minutes

Zero-shot on synthetic data can only beat chance if an image's signal is tied to its labels'
TEXT: with :func:`write_text_tied_chestxray14` each finding draws a pattern that is a linear
function of that label's text embedding (the same frozen encoder and ``labels.yaml`` texts the
model uses). Concretely, the 14 label vectors are centred and projected on their first
``n_codes`` principal directions; label c's code ``a_c`` (scaled to max |a| = 1) sets the
signed brightness of ``n_codes`` fixed Gaussian blobs; an image adds the patterns of all its
findings to a chest-like background, plus noise. Labels whose texts are alike therefore look
alike, which is the premise of cross-modal zero-shot learning. The label files, lists and
patients come from ``medmetric.datamodules.synthetic.write_chestxray14`` (its own images, one blob per
label at a fixed place, are re-drawn); ``--control`` also runs the cross-modal model on that
untied set, where the unseen AUROC should stay near chance.

Rows: chance (uniformly random scores on the same test set, mean over 200 draws), the
multi-label BCE baseline (MultiLabelPretrainModule trained on the seen labels: its unseen
columns are an untrained linear head, so it cannot score unseen labels: printed in brackets),
and the cross-modal model with each loss. All runs go through the CLI with experiments/
chestxray14/gzsl.yaml (or baseline.yaml) and read the test metrics from results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from medmetric.datamodules.chest_xray import CHESTXRAY14_LABELS, DEFAULT_UNSEEN  # noqa: E402
from medmetric.datamodules.synthetic import write_chestxray14  # noqa: E402
from medmetric.lightning_modules.metrics.multilabel import gzsl_auroc  # noqa: E402
from medmetric.run_io.atomic import atomic_write
from medmetric.text.label_embeddings import DEFAULT_TEXT_ENCODER, label_embeddings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROWS = {
    "bce": ("multi-label BCE (seen labels only)", "experiments/chestxray14/baseline.yaml", []),
    "cm_wfe": ("cross-modal, weighted_focused_euclidean", "experiments/chestxray14/gzsl.yaml",
               ["--model.loss=weighted_focused_euclidean"]),
    "cm_dwm": ("cross-modal, dual_weighted_metric", "experiments/chestxray14/gzsl.yaml",
               ["--model.loss=dual_weighted_metric", "--model.loss_kwargs={}"]),
}


def text_codes(label_vectors: torch.Tensor, n_codes: int) -> np.ndarray:
    """(C, n_codes): the label vectors' coordinates on their first principal directions, max |.| = 1."""
    x = label_vectors.double().numpy()
    x = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    codes = x @ vt[:n_codes].T
    return codes / np.abs(codes).max()


def blob_basis(n_codes: int, size: int) -> np.ndarray:
    """(n_codes, size, size) Gaussian blobs on a grid inside the lung area."""
    side = int(np.ceil(np.sqrt(n_codes)))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    basis = []
    for k in range(n_codes):
        gx, gy = 0.2 + 0.6 * (k % side + 0.5) / side, 0.2 + 0.6 * (k // side + 0.5) / side
        basis.append(np.exp(-((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * (0.28 / side) ** 2)))
    return np.stack(basis)


def render_text_tied(findings: np.ndarray, codes: np.ndarray, basis: np.ndarray, rng: np.random.Generator,
                     strength: float = 0.25, noise: float = 0.05) -> np.ndarray:
    """A float image in [0, 1]: background + strength * sum over findings of codes[c] . basis."""
    size = basis.shape[-1]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    img = np.full((size, size), 0.5) + rng.normal(0, 0.03)
    for cx in (0.3, 0.7):
        img -= 0.15 * np.exp(-(((xx - cx) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    for c in np.flatnonzero(findings):
        img += strength * np.tensordot(codes[c], basis, axes=1)
    img += rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 1)


def write_text_tied_chestxray14(root: Path, label_vectors: torch.Tensor, n_patients: int = 400, seed: int = 0,
                                image_size: int = 32, n_codes: int = 8, strength: float = 0.25,
                                test_fraction: float = 0.25) -> Path:
    """A synthetic ChestX-ray14 whose image signal is a linear function of the labels' text vectors."""
    write_chestxray14(root, n_patients=n_patients, seed=seed, image_size=image_size, test_fraction=test_fraction)
    codes, basis = text_codes(label_vectors, n_codes), blob_basis(n_codes, image_size)
    table = pd.read_csv(root / "Data_Entry_2017.csv")
    files = {p.name: p for p in root.glob("images*/**/*.png")}
    rng = np.random.default_rng(seed + 1)
    for name, findings in zip(table["Image Index"], table["Finding Labels"], strict=True):
        multi_hot = np.array([label in findings.split("|") for label in CHESTXRAY14_LABELS])
        pixels = render_text_tied(multi_hot, codes, basis, rng, strength)
        path = files[name]
        image = Image.fromarray(np.rint(pixels * 255).astype(np.uint8), "L")
        atomic_write(path, lambda handle, image=image: image.save(handle, "PNG"), what="synthetic X-ray")
    return root


def run_row(key: str, data_dir: Path, runs_dir: Path, args, seed: int) -> dict:
    from medmetric.experiments.cli import main

    experiment = f"{data_dir.name}-{key}-seed{seed}"
    done = sorted((runs_dir / experiment / "stage1").glob("*/results.json"))
    if args.resume and done:  # a finished run of the same row, data and seed
        return json.loads(done[-1].read_text())["metrics"]
    _, config, extra = ROWS[key]
    if key.startswith("cm_"):
        extra = [*extra, f"--model.text_encoder={args.text_encoder}"]
    main([
        "fit", "--config", str(REPO / config), f"--data.data_dir={data_dir}", f"--runs_dir={runs_dir}",
        f"--experiment={experiment}", f"--seed_everything={seed}", f"--model.backbone={args.backbone}",
        f"--data.image_size={args.image_size}", f"--data.batch_size={args.batch_size}", "--data.num_workers=0",
        f"--data.unseen_labels=[{', '.join(args.unseen)}]", "--data.augment=none", f"--trainer.max_epochs={args.epochs}",
        "--trainer.log_every_n_steps=5", "--trainer.enable_progress_bar=false", "--wandb=disabled",
        f"--model.lr={args.lr}", *extra,
    ])
    run = sorted((runs_dir / experiment / "stage1").iterdir())[-1]  # this call's run (folders are UTC-named)
    return json.loads((run / "results.json").read_text())["metrics"]


def chance_row(data_dir: Path, unseen: list[str], draws: int = 200) -> dict:
    """Uniformly random scores on the test images: the empirical chance level of each column."""
    table = pd.read_csv(data_dir / "Data_Entry_2017.csv")
    test = set((data_dir / "test_list.txt").read_text().split())
    findings = table.loc[table["Image Index"].isin(test), "Finding Labels"].str.split("|")
    targets = torch.tensor([[label in f for label in CHESTXRAY14_LABELS] for f in findings], dtype=torch.float32)
    seen = [i for i, n in enumerate(CHESTXRAY14_LABELS) if n not in unseen]
    unseen_idx = [CHESTXRAY14_LABELS.index(n) for n in unseen]
    g = torch.Generator().manual_seed(0)
    values = [gzsl_auroc(torch.rand(targets.shape, generator=g), targets, seen, unseen_idx) for _ in range(draws)]
    return {k: statistics.mean(v[k] for v in values) for k in values[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gzsl_table", help="data sets and runs go here")
    parser.add_argument("--n_patients", type=int, default=400)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--test_fraction", type=float, default=0.4, help="patients in the test list (more: steadier unseen AUROC)")
    parser.add_argument("--n_codes", type=int, default=8, help="principal text directions drawn into the images")
    parser.add_argument("--strength", type=float, default=0.25)
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--unseen", nargs="+", default=list(DEFAULT_UNSEEN))
    parser.add_argument("--control", action="store_true", help="also run cross-modal (wfe) on the untied synthetic set")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs of the same row, data and seed")
    parser.add_argument("--text_encoder", default=DEFAULT_TEXT_ENCODER, help="for the data's codes and the model")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vectors = label_embeddings(list(CHESTXRAY14_LABELS), REPO / "experiments/chestxray14/labels.yaml",
                               text_encoder=args.text_encoder)
    tied = out / f"tied-p{args.n_patients}-s{args.image_size}-k{args.n_codes}-t{args.test_fraction}"
    if not (tied / "Data_Entry_2017.csv").is_file():
        write_text_tied_chestxray14(tied, vectors, args.n_patients, 0, args.image_size, args.n_codes, args.strength,
                                    args.test_fraction)
    runs_dir = out / "runs"
    results = [("chance (random scores)", chance_row(tied, args.unseen), 1)]
    plan = [(ROWS[key][0], key, tied) for key in args.rows]
    if args.control:
        untied = out / f"untied-p{args.n_patients}-s{args.image_size}-t{args.test_fraction}"
        if not (untied / "Data_Entry_2017.csv").is_file():
            write_chestxray14(untied, n_patients=args.n_patients, seed=0, image_size=args.image_size,
                              test_fraction=args.test_fraction)
        plan.append(("control: cross-modal wfe, images NOT tied to text", "cm_wfe", untied))
    for name, key, data_dir in plan:
        per_seed = [run_row(key, data_dir, runs_dir, args, seed) for seed in args.seeds]
        mean = {k: statistics.mean(m[k] for m in per_seed) for k in ("seen_auroc", "unseen_auroc", "harmonic_auroc")}
        results.append((name, mean, len(per_seed)))
    print(f"\nSynthetic ChestX-ray14 GZSL ({args.n_patients} patients, {args.image_size} px, {args.backbone}, "
          f"{args.epochs} epochs; unseen: {', '.join(args.unseen)}; test AUROC, mean over seeds {args.seeds})\n")
    print("| method | seen AUROC | unseen AUROC | harmonic mean |\n|---|---|---|---|")
    for name, m, _ in results:
        if name.startswith("multi-label BCE"):
            print(f"| {name} | {m['seen_auroc']:.3f} | n/a ({m['unseen_auroc']:.3f}, untrained columns) | n/a |")
        else:
            print(f"| {name} | {m['seen_auroc']:.3f} | {m['unseen_auroc']:.3f} | {m['harmonic_auroc']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
