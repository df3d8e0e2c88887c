"""``make demo``: one-stage CE vs two-stage CE -> cRT vs CE + SupCon -> cRT, in one table.

Runs on ../shared/data/ham10000 when present, otherwise on a generated HAM10000-format set.
Each fit is a normal CLI run (``python -m medmetric.experiments fit ...``) in a subprocess, so every
number in the table can be reproduced with the command logged next to it. Both stage-1 runs
use one split file, so the three rows are tested on the same images.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from medmetric.experiments.runner import resolve_ham10000, run_fit

CONFIGS = {"stage1": "experiments/ham10000/stage1.yaml", "stage2": "experiments/ham10000/stage2.yaml"}
PLAN = (  # (experiment, stage, flags beyond the config, table row or None)
    ("demo-ce", "stage1", ["--model.metric_weight=0", "--data.sampler=instance"], "(a) CE, one stage"),
    ("demo-ce", "stage2", [], "(b) CE -> cRT"),
    ("demo-supcon", "stage1", [], None),
    ("demo-supcon", "stage2", [], "(c) CE+SupCon -> cRT"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", help="HAM10000 folder (default: ../shared/data/ham10000 if present, else synthetic)")
    parser.add_argument("--runs_dir", default="runs")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--stage1_epochs", type=int, default=5)
    parser.add_argument("--stage2_epochs", type=int, default=2)
    parser.add_argument("--max_steps", type=int, default=-1, help="cap on optimizer steps per fit (smoke runs)")
    parser.add_argument("--wandb", default="auto", help="auto (offline without an API key), online, offline, disabled")
    parser.epilog = "Any other flag (e.g. --trainer.accelerator=gpu) is passed to every fit."
    args, args.extra = parser.parse_known_args(argv)
    return args


def format_table(rows: list[tuple[str, dict]], class_names: list[str], counts: list[int]) -> str:
    head = ["method", "bal.acc", "macro F1"] + [f"{c}({n})" for c, n in zip(class_names, counts, strict=True)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, metrics in rows:
        cells = [metrics["balanced_accuracy"], metrics["macro_f1"]] + [metrics[f"recall/{c}"] for c in class_names]
        lines.append("| " + " | ".join([label] + ["nan" if math.isnan(v) else f"{v:.3f}" for v in cells]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs_dir = Path(args.runs_dir)
    data_dir, source = resolve_ham10000(args.data_dir, Path(args.runs_dir))
    demo_dir = runs_dir / "demo"
    log_dir = demo_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    common = [
        f"--data.data_dir={data_dir}", f"--runs_dir={runs_dir}", f"--data.split_file={demo_dir / 'split.csv'}",
        f"--data.image_size={args.image_size}", f"--trainer.max_steps={args.max_steps}", f"--wandb={args.wandb}",
        *args.extra,
    ]
    stage1 = [f"--model.backbone={args.backbone}", f"--trainer.max_epochs={args.stage1_epochs}"]
    stage2 = [f"--trainer.max_epochs={args.stage2_epochs}"]
    print(f"medmetric demo on {data_dir} ({source}); logs in {log_dir}", flush=True)
    start = time.time()
    results: list[tuple[str, dict]] = []
    for experiment, stage, flags, label in PLAN:
        stage_flags = stage1 if stage == "stage1" else stage2
        run = run_fit(CONFIGS[stage], experiment, stage, common + stage_flags + flags, runs_dir, log_dir)
        if label:
            results.append((label, json.loads((run / "results.json").read_text())))
    first = results[0][1]
    table = format_table([(label, r["metrics"]) for label, r in results], first["class_names"], first["train_class_counts"])
    where = "\n".join(f"  {label}: {r['run_dir']}" for label, r in results)
    summary = (
        f"Test set of {data_dir} ({source}); recall per class, training images in brackets.\n\n"
        f"{table}\n\nRuns:\n{where}\nTotal wall time: {time.time() - start:.0f} s\n"
    )
    (demo_dir / "summary.md").write_text(summary)
    print("\n" + summary + f"(also in {demo_dir / 'summary.md'})")


if __name__ == "__main__":
    main()
