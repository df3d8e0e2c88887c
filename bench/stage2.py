"""Stage-2 benchmark: one cRT epoch on cached backbone features against the uncached path.

Same data (a generated HAM10000-format set, or --data_dir), same frozen stage-1 backbone, same
class-balanced sampler and head, no augmentation, measured in one process with the real
RebalancedHeadModule and Trainer. The one-time cost of building the cache is printed too.

    python -m bench.stage2 [--n_images 2000] [--backbone resnet18] [--image_size 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from medmetric.callbacks.feature_cache import FeatureCache  # noqa: E402
from medmetric.callbacks.handoff import stage1_manifest  # noqa: E402
from medmetric.datamodules.skin import HAM10000DataModule  # noqa: E402
from medmetric.datamodules.synthetic import write_ham10000  # noqa: E402
from medmetric.lightning_modules.metric_pretrain import MetricPretrainModule  # noqa: E402
from medmetric.lightning_modules.rebalanced_head import RebalancedHeadModule  # noqa: E402
from medmetric.run_io.manifest import write_manifest  # noqa: E402


def untrained_handoff(work: Path, datamodule: HAM10000DataModule, backbone: str) -> Path:
    """A handoff from an untrained stage-1 model: timing does not depend on the weights."""
    stage1 = MetricPretrainModule(datamodule.class_names, backbone=backbone)
    manifest = stage1_manifest(work, stage1, stage1.state_dict(), datamodule.class_counts, datamodule.split_sha256())
    write_manifest(work / "handoff.json", manifest)
    return work / "handoff.json"


def timed_epoch(manifest: Path, datamodule_args: dict, callbacks: list) -> tuple[float, float]:
    """(seconds of setup incl. any cache build, seconds of one training epoch)."""
    datamodule = HAM10000DataModule(**datamodule_args)
    model = RebalancedHeadModule(datamodule.class_names, handoff=str(manifest), feature_cache=bool(callbacks))
    epoch_times: list[float] = []

    class EpochTimer(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            epoch_times.append(time.perf_counter() - self.start)

    trainer = L.Trainer(
        max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[*callbacks, EpochTimer()],
        use_distributed_sampler=False,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    return time.perf_counter() - start - epoch_times[0], epoch_times[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir")
    parser.add_argument("--n_images", type=int, default=2000)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image_size", type=int, default=64)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_dir = Path(args.data_dir) if args.data_dir else write_ham10000(work / "data", n_images=args.n_images)
        datamodule_args = dict(
            data_dir=str(data_dir), image_size=args.image_size, batch_size=64, sampler="class_balanced",
            augment="none", preload=True, num_workers=0, split_file=str(work / "split.csv"),
        )
        reference = HAM10000DataModule(**datamodule_args)
        reference.prepare_data()
        reference.setup()
        manifest = untrained_handoff(work, reference, args.backbone)
        torch.manual_seed(0)
        _, uncached = timed_epoch(manifest, datamodule_args, [])
        build, first_cached = timed_epoch(manifest, datamodule_args, [FeatureCache(str(work / "cache"))])
        _, cached = timed_epoch(manifest, datamodule_args, [FeatureCache(str(work / "cache"))])
    train = len(reference.datasets["train"])
    print(f"cRT, {train} training images, {args.backbone} at {args.image_size} px, class-balanced batches of 64, CPU threads {torch.get_num_threads()}")
    print("| path | epoch s | ratio to uncached |")
    print("|---|---|---|")
    print(f"| images through the frozen backbone | {uncached:.2f} | 1.00 |")
    print(f"| cached features (first run) | {first_cached:.3f} | {uncached / first_cached:.1f}x faster |")
    print(f"| cached features (reused cache) | {cached:.3f} | {uncached / cached:.1f}x faster |")
    print(f"one-time cache build incl. setup: {build:.2f} s (train + val + test features)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
