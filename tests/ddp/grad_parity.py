"""Run as a script: 2 gloo processes check that the gathered metric loss, after DDP-style
gradient averaging, has exactly the gradient of one process holding the whole batch.

Usage: python -m tests.ddp.grad_parity OUT.json
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medmetric.lightning_modules.losses import build_metric_loss
from medmetric.lightning_modules.losses import distributed as gather_module
from medmetric.lightning_modules.losses.distributed import gather_across_ranks

WORLD, PER_RANK, IN_DIM, EMB, CLASSES = 2, 12, 10, 8, 4
LOSSES = {
    "supcon": {},
    "triplet": {},
    "multi_similarity": {},
    "arcface": {},  # owns W
    "class_center_triplet": {"center_mode": "learnable", "start_epoch": 0},  # owns centres
    "class_center_triplet_running": {"start_epoch": 0},
}


def make(name: str):
    torch.manual_seed(0)
    encoder = torch.nn.Linear(IN_DIM, EMB)
    loss_name = name.replace("_running", "")
    loss = build_metric_loss(loss_name, num_classes=CLASSES, embedding_dim=EMB, **LOSSES[name])
    return encoder, loss


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD * PER_RANK, IN_DIM, generator=g)
    y = torch.arange(CLASSES).repeat(WORLD * PER_RANK // CLASSES)[torch.randperm(WORLD * PER_RANK, generator=g)]
    return x, y


def grads(encoder, loss) -> dict[str, torch.Tensor]:
    params = dict(encoder.named_parameters()) | {f"loss.{k}": v for k, v in loss.named_parameters()}
    return {k: v.grad.clone() for k, v in params.items()}


def single_process(name: str):
    encoder, loss = make(name)
    x, y = batch()
    value = loss(torch.nn.functional.normalize(encoder(x)), y)
    value.backward()
    return float(value.detach()), grads(encoder, loss)


def worker(rank: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PARITY_PORT", "29533"))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    x, y = batch()
    local = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    report = {}
    for name in [*LOSSES, "control_unscaled"]:
        control = name == "control_unscaled"  # without the gradient scale parity must fail
        if control:
            gather_module._ScaleGrad.apply = staticmethod(lambda t, scale: t)
            name = "supcon"
        encoder, loss = make(name)
        emb = torch.nn.functional.normalize(encoder(x[local]))
        value = loss(gather_across_ranks(emb), gather_across_ranks(y[local]))
        value.backward()
        distributed = grads(encoder, loss)
        for g in distributed.values():  # what DDP does: average over ranks
            dist.all_reduce(g)
            g /= WORLD
        if rank == 0:
            ref_value, reference = single_process(name)
            report["control_unscaled" if control else name] = {
                "value_diff": abs(float(value.detach()) - ref_value),
                "max_grad_diff": max(float((distributed[k] - reference[k]).abs().max()) for k in reference),
                "params": sorted(reference),
            }
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(report, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    mp.spawn(worker, args=(sys.argv[1],), nprocs=WORLD, join=True)
