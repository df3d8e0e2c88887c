"""``make reproduce``: the paper-style comparison on HAM10000, over several seeds, with a report.

Methods (each a normal CLI run; seeds vary the training, the lesion-grouped split is shared):

    one-stage CE                       stage 1, CE, instance sampling
    one-stage balanced softmax         stage 1, balanced-softmax loss, instance sampling
    CE -> cRT, CE -> LWS               stage 2 on the one-stage CE backbone
    CE+SupCon -> cRT                   stage 1 CE + supervised contrastive, m-per-class batches
    CE+class_center_triplet -> cRT     stage 1 CE + PCCT, m-per-class batches

Stage 2 trains on cached backbone features (no augmentation), shared by cRT and LWS.
``--small`` (``make reproduce SMALL=1``) is sized for 2 CPU cores (resnet10t, 32 px, 5 + 5 epochs); the
default is the GPU size (224 px, resnet50, 60 + 10 epochs).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from medmetric.experiments import report
from medmetric.experiments.runner import resolve_ham10000, run_fit

STAGE1 = "experiments/ham10000/stage1.yaml"
STAGE2 = "experiments/ham10000/stage2.yaml"
INSTANCE_CE = ["--model.metric_weight=0", "--data.sampler=instance"]
# (experiment, stage, config, flags, stage-1 experiment whose handoff stage 2 uses)
PLAN = (
    ("ce", "stage1", STAGE1, INSTANCE_CE, None),
    ("balanced-softmax", "stage1", STAGE1, [*INSTANCE_CE, "--model.head_loss=balanced_softmax"], None),
    ("ce-crt", "stage2", STAGE2, ["--model.strategy=crt"], "ce"),
    ("ce-lws", "stage2", STAGE2, ["--model.strategy=lws"], "ce"),
    ("supcon", "stage1", STAGE1, ["--model.metric_loss=supcon"], None),
    ("supcon-crt", "stage2", STAGE2, ["--model.strategy=crt"], "supcon"),
    ("cct", "stage1", STAGE1, ["--model.metric_loss=class_center_triplet"], None),
    ("cct-crt", "stage2", STAGE2, ["--model.strategy=crt"], "cct"),
)
REPORTED = {  # report label -> experiment and stage of its runs
    "one-stage CE": ("ce", "stage1"),
    "one-stage balanced softmax": ("balanced-softmax", "stage1"),
    "CE -> cRT": ("ce-crt", "stage2"),
    "CE -> LWS": ("ce-lws", "stage2"),
    "CE+SupCon -> cRT": ("supcon-crt", "stage2"),
    "CE+class_center_triplet -> cRT": ("cct-crt", "stage2"),
}
SIZES = {
    "small": {"image_size": 32, "backbone": "resnet10t", "stage1_epochs": 5, "stage2_epochs": 5},
    # ~2.5k img/s for resnet50 at 224 px with mixed precision on one recent GPU: 60 epochs of the
    # ~6k HAM10000 training images take ~3 min a run, 12 stage-1 runs ~40 min (estimate, not measured)
    "full": {"image_size": 224, "backbone": "resnet50", "stage1_epochs": 60, "stage2_epochs": 10},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", help="HAM10000 folder (default: ../shared/data/ham10000 if present, else synthetic)")
    parser.add_argument("--runs_dir", default="runs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="CPU size: 32 px, resnet10t, 5 + 5 epochs")
    parser.add_argument("--backbone", help="timm model for stage 1 (default: resnet18 small, resnet50 full)")
    parser.add_argument("--wandb", default="auto")
    parser.epilog = "Any other flag (e.g. --trainer.accelerator=gpu) is passed to every fit."
    args, args.extra = parser.parse_known_args(argv)
    return args


def experiment_name(method: str, seed: int) -> str:
    return f"repro-{method}-seed{seed}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs_dir = Path(args.runs_dir)
    size = SIZES["small" if args.small else "full"] | ({"backbone": args.backbone} if args.backbone else {})
    data_dir, source = resolve_ham10000(args.data_dir, runs_dir)
    out_dir = runs_dir / "reproduce"
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    common = [
        f"--data.data_dir={data_dir}", f"--runs_dir={runs_dir}", f"--data.split_file={out_dir / 'split.csv'}",
        f"--data.image_size={size['image_size']}", f"--wandb={args.wandb}", *args.extra,
    ]
    per_stage = {
        "stage1": [f"--model.backbone={size['backbone']}", f"--trainer.max_epochs={size['stage1_epochs']}"],
        "stage2": [f"--trainer.max_epochs={size['stage2_epochs']}", "--model.feature_cache=true", "--data.augment=none"],
    }
    print(f"medmetric reproduce on {data_dir} ({source}), {args.seeds} seeds, {'small' if args.small else 'full'} size", flush=True)
    start = time.time()
    runs: dict[str, list[Path]] = {label: [] for label in REPORTED}
    for seed in range(args.seeds):
        seeded = [f"--seed_everything={seed}", f"--data.seed={seed}"]
        for method, stage, config, flags, source_method in PLAN:
            experiment = experiment_name(method, seed)
            handoff = [f"--model.handoff={runs_dir / experiment_name(source_method, seed) / 'handoff.json'}"] if source_method else []
            run = run_fit(config, experiment, stage, common + per_stage[stage] + seeded + flags + handoff, runs_dir, log_dir)
            for label, (reported_method, reported_stage) in REPORTED.items():
                if (reported_method, reported_stage) == (method, stage):
                    runs[label].append(run)
    labels = [f"--label={label}={run}" for label, paths in runs.items() for run in paths]
    report_dir = out_dir / f"report-{time.strftime('%Y%m%d-%H%M%S')}"
    code = report.main([*(str(p) for paths in runs.values() for p in paths), "--out", str(report_dir), f"--wandb={args.wandb}", *labels])
    print(f"\nTotal wall time: {time.time() - start:.0f} s; report in {report_dir}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
