"""Kimia Path24 retrieval demo (``make demo-kimia``): stage 1, retrieval evaluation, index, search.

1. stage 1 with ``experiments/kimia_path24/stage1.yaml`` (CE + multi-similarity), CPU-sized;
2. ``python -m medmetric.experiments.retrieval_eval``: leave-one-out R@1/5/10, MAP@R, P@1 on the test
   patches, and eta_p / eta_W / eta_total (test patches searched among the training patches);
3. ``medmetric index`` of the training patches and ``medmetric search`` of the test patches.

Data: ``--data_dir``, else ``../shared/data/kimia_path24``, else a generated set in the RGB
release layout (``datamodules/synthetic_histopathology.py``; its numbers only show that the
pipeline runs). Every step is an ordinary command, printed before it runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from medmetric.datamodules.histopathology import KimiaPath24DataModule
from medmetric.datamodules.synthetic_histopathology import write_kimia_rgb
from medmetric.experiments.runner import run_fit

REAL_KIMIA = Path("../shared/data/kimia_path24")
CPU_FLAGS = ["--model.backbone=resnet10t", "--data.image_size=32", "--trainer.max_epochs=5", "--data.batch_size=48"]


def resolve_data(data_dir: str | None, demo_dir: Path) -> Path:
    if data_dir:
        return Path(data_dir)
    if REAL_KIMIA.exists():
        return REAL_KIMIA
    synthetic = demo_dir / "synthetic_kimia"
    if not (synthetic / "Testing").is_dir():
        write_kimia_rgb(synthetic, n_train=12, n_test=4, patch_size=48, seed=0)
    return synthetic


def step(command: list[str]) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--runs_dir", default="runs")
    parser.add_argument("--experiment", default="kimia-demo")
    parser.add_argument("--k", type=int, default=10)
    args, fit_flags = parser.parse_known_args(argv)
    runs_dir = Path(args.runs_dir)
    demo_dir = runs_dir / args.experiment
    demo_dir.mkdir(parents=True, exist_ok=True)
    data_dir = resolve_data(args.data_dir, demo_dir)
    print(f"data: {data_dir}")
    flags = [f"--data.data_dir={data_dir}", f"--runs_dir={runs_dir}", "--wandb=disabled", *CPU_FLAGS, *fit_flags]
    run = run_fit("experiments/kimia_path24/stage1.yaml", args.experiment, "stage1", flags, runs_dir, demo_dir)
    handoff = str(run / "handoff.json")

    table = KimiaPath24DataModule(str(data_dir)).read_index()  # both layouts -> path,label lists
    lists = {}
    for split in ("train", "test"):
        lists[split] = run / f"{split}_patches.csv"
        table.loc[table["split"] == split, ["path", "label"]].to_csv(lists[split], index=False)
    python = [sys.executable, "-m", "medmetric.experiments"]
    step([sys.executable, "-m", "medmetric.experiments.retrieval_eval", "--model", handoff, "--kimia", str(data_dir),
          "--quiet", "--out", str(run / "retrieval.json")])
    step([*python, "index", "--model", handoff, "--images", str(lists["train"]), "--out", str(run / "index"), "--quiet"])
    step([*python, "search", "--index", str(run / "index"), "--query", str(lists["test"]), "--k", str(args.k),
          "--show", "8", "--quiet"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
