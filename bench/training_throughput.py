"""Training throughput: a stage-1 epoch through medmetric vs a bare PyTorch loop.

Both sides train the same model (MetricPretrainModule's backbone, head and projector, CE +
metric_weight x SupCon), on the same data (HAM10000DataModule's training set, decoded once into
RAM as the demo does), with the same m-per-class batches, batch size, AdamW + per-step cosine.
medmetric runs it as users do: DataModule -> sampler -> LightningModule.training_step (logging
on every step) -> Trainer (CSV logger, no checkpointing or validation inside the timed window);
the bare loop is ``for x, y in loader: loss.backward(); opt.step(); sched.step()``. Each side runs
``--repeats`` times, alternating; the best epoch counts. Images/s cover the training batches only
(setup, cache builds and validation excluded on both sides).

CPU (default): fp32. GPU (``--device cuda``): bf16 autocast and channels_last on both sides, and
the share of the epoch spent waiting for data (time in ``next(loader)``, bare loop; time between
the end of one batch and the start of the next, medmetric).

    python -m bench.training_throughput [--batches 20] [--backbone resnet18] [--image_size 64]
    python -m bench.training_throughput --device cuda --image_size 224 --batch_size 128 --num_workers 8
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from medmetric.datamodules.skin import HAM10000DataModule  # noqa: E402
from medmetric.datamodules.synthetic import write_ham10000  # noqa: E402
from medmetric.lightning_modules.metric_pretrain import MetricPretrainModule  # noqa: E402

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ham10000"


class EpochTimer(L.Callback):
    """Wall time of the first ``batches`` training batches, and the gaps between batches."""

    def __init__(self, device: str):
        self.device, self.epoch, self.wait, self._last_end = device, 0.0, 0.0, None

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_train_epoch_start(self, trainer, pl_module):
        self._sync()
        self.start = self._last_end = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync()
        self.wait += time.perf_counter() - self._last_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync()
        self._last_end = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self._sync()
        self.epoch = self._last_end - self.start


def make_datamodule(args) -> HAM10000DataModule:
    return HAM10000DataModule(
        str(args.data_dir), image_size=args.image_size, batch_size=args.batch_size, sampler="m_per_class",
        m_per_class=args.m_per_class, augment="dermoscopy", preload=True, num_workers=args.num_workers, seed=0,
    )


def make_model(datamodule, args) -> MetricPretrainModule:
    torch.manual_seed(0)
    return MetricPretrainModule(datamodule.class_names, backbone=args.backbone, metric_loss="supcon", metric_weight=1.0, lr=1e-3)


def run_medmetric(args, datamodule: HAM10000DataModule, work: Path) -> tuple[float, float]:
    model = make_model(datamodule, args)
    timer = EpochTimer(args.device)
    callbacks = [timer]
    if args.device == "cuda":
        from medmetric.callbacks.speed import SpeedOptions

        callbacks.append(SpeedOptions(channels_last=True))
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, max_epochs=1,
        precision="bf16-mixed" if args.device == "cuda" else "32-true", limit_train_batches=args.batches,
        limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, logger=CSVLogger(str(work), name="bench"), log_every_n_steps=args.log_every_n_steps,
        callbacks=callbacks, use_distributed_sampler=False,
    )
    trainer.fit(model, datamodule=datamodule)
    return args.batches * args.batch_size / timer.epoch, timer.wait / timer.epoch


def run_bare(args, datamodule: HAM10000DataModule) -> tuple[float, float]:
    device = torch.device(args.device)
    model = make_model(datamodule, args).to(device)
    if args.device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.train()
    loader = datamodule.train_dataloader()
    loader.batch_sampler.set_epoch(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.batches)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device == "cuda")
    wait = 0.0
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    iterator = iter(loader)
    for _ in range(args.batches):
        fetch = time.perf_counter()
        images, targets = next(iterator)
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        wait += time.perf_counter() - fetch
        with autocast:
            features = model.backbone(images)
            loss = F.cross_entropy(model.head(features), targets) + model.metric_loss(model.projector(features), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        sync()
    elapsed = time.perf_counter() - start
    return args.batches * args.batch_size / elapsed, wait / elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", type=Path, default=None)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--m_per_class", type=int, default=16)
    parser.add_argument("--batches", type=int, default=20, help="training batches per timed epoch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--log_every_n_steps", type=int, default=20, help="as in experiments/*/stage1.yaml")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.data_dir is None:
            args.data_dir = REAL if (REAL / "HAM10000_metadata.csv").is_file() else write_ham10000(work / "ham", n_images=1500, seed=0)
        datamodule = make_datamodule(args)
        datamodule.setup("fit")  # decoded once; both sides then use the same dataset and sampler
        medmetric, bare = [], []
        for _ in range(args.repeats):
            bare.append(run_bare(args, datamodule))
            medmetric.append(run_medmetric(args, datamodule, work))
        best_m, best_b = max(medmetric), max(bare)
        mode = "bf16-mixed + channels_last" if args.device == "cuda" else "fp32"
        print(f"\ndata: {args.data_dir}; {args.backbone} at {args.image_size} px, batch {args.batch_size} "
              f"(m-per-class {args.m_per_class}), {args.batches} batches, {args.device} {mode}, "
              f"torch threads {torch.get_num_threads()}, num_workers {args.num_workers}; best of {args.repeats}\n")
        print("| loop | images/s | data-wait share | vs bare loop |")
        print("|---|---:|---:|---:|")
        print(f"| bare PyTorch | {best_b[0]:,.1f} | {best_b[1]:.1%} | 1.00 |")
        print(f"| medmetric (DataModule, sampler, Lightning, logging) | {best_m[0]:,.1f} | {best_m[1]:.1%} | {best_m[0] / best_b[0]:.2f} |")
        print(f"\nall epochs (images/s): bare {[round(b[0], 1) for b in bare]}, medmetric {[round(m[0], 1) for m in medmetric]}")


if __name__ == "__main__":
    main()
