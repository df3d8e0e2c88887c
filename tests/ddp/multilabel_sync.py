"""Two gloo processes, uneven shards: MultiLabelMetrics.compute and the synced (scores, targets)
that the threshold choice uses must equal one process holding all the data.

Usage: python -m tests.ddp.multilabel_sync OUT.json   (rank 0 writes the synced results)
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medmetric.lightning_modules.metrics.multilabel import MultiLabelMetrics, choose_f1_thresholds

NAMES = ["a", "b", "c"]


def data():
    rng = np.random.default_rng(0)
    targets = (rng.random((41, 3)) < [0.3, 0.1, 0.5]).astype(np.float32)
    scores = np.round(rng.normal(size=(41, 3)) + targets, 1).astype(np.float32)
    return torch.from_numpy(scores), torch.from_numpy(targets)


def worker(rank: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MULTILABEL_SYNC_PORT", "29531"))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    scores, targets = data()
    rows = slice(0, 30) if rank == 0 else slice(30, 41)  # uneven: 30 and 11 rows
    metric = MultiLabelMetrics(NAMES)
    metric.update(scores[rows], targets[rows])
    with metric.sync_context():
        synced_scores, synced_targets = metric.scores_and_targets()
        thresholds = choose_f1_thresholds(synced_scores, synced_targets)
    metric.set_thresholds(thresholds)
    values = metric.compute()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"values": values, "thresholds": thresholds.tolist(), "rows": len(synced_scores)}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=2, join=True)
