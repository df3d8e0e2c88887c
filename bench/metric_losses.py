"""Metric-loss benchmark: our wrappers against pytorch-metric-learning called directly.

For batch sizes 256 and 1024, embedding 128, 7 classes, forward+backward of every registered
PML loss through medmetric's wrapper and through the bare PML object it holds (same tensors,
same parameters, same process, measurements interleaved so machine drift hits both alike).
Prints time, peak memory and their ratios, and checks the two give the same value.
``class_center_triplet`` (ours, no PML equivalent) is timed against PML's batch-hard triplet,
the loss it replaces.

Peak memory on CPU is the growth of the process's peak resident set during one
forward+backward (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``); on CUDA it is
``torch.cuda.max_memory_allocated``.

    python -m bench.metric_losses [--batch_sizes 256 1024] [--device cpu]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections.abc import Callable

import torch

from medmetric.lightning_modules.losses import build_metric_loss
from medmetric.lightning_modules.losses.pml import PML_LOSSES

EMBEDDING_DIM, NUM_CLASSES = 128, 7
# PML's NTXentLoss masks a (positive pairs x negative pairs) matrix: with label-defined
# positives and 7 classes that is ~5e8 entries at B=256 and ~1.3e11 at B=1024.
PAIR_MATRIX_LIMIT = 2e8


def peak_memory_mb(step: Callable[[], None], device: torch.device) -> float:
    """Peak memory growth of one call of ``step`` (MB)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    status = lambda key: int(re.search(rf"{key}:\s+(\d+)", open("/proc/self/status").read()).group(1))  # noqa: E731
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current resident set
    before = status("VmRSS")
    step()
    return max(0.0, (status("VmHWM") - before) / 1024)  # pages reused from the heap can make it < 0


def seconds(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def forward_backward(loss_fn: Callable, embeddings: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    def step():
        emb = embeddings.detach().requires_grad_()
        loss_fn(emb, labels).backward()

    return step


def compare(ours: Callable, reference: Callable, device: torch.device, rounds: int, budget_s: float = 3.0) -> tuple[float, float, float, float]:
    """Median seconds and peak MB of both, measured alternately after a warm-up.

    Slow losses get fewer rounds (at least 3) so the whole table stays within minutes.
    """
    ours()
    first = seconds(reference, device)
    rounds = max(3, min(rounds, int(budget_s / max(first, 1e-6))))
    times: dict[str, list[float]] = {"ours": [], "ref": []}
    for round_ in range(rounds):  # alternate who goes first: no order bias
        order = (("ours", ours), ("ref", reference)) if round_ % 2 == 0 else (("ref", reference), ("ours", ours))
        for name, step in order:
            times[name].append(seconds(step, device))
    return (
        statistics.median(times["ours"]),
        statistics.median(times["ref"]),
        peak_memory_mb(ours, device),
        peak_memory_mb(reference, device),
    )


def direct_pml(wrapped) -> Callable:
    """The bare PML call the wrapper makes, without the wrapper."""

    def call(embeddings, labels):
        tuples = wrapped.miner(embeddings, labels) if wrapped.miner is not None else None
        return wrapped.loss(embeddings, labels, tuples)

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows, mismatches, skipped = [], [], []
    for batch in args.batch_sizes:
        embeddings = torch.nn.functional.normalize(torch.randn(batch, EMBEDDING_DIM, device=device), dim=1)
        labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
        counts = torch.bincount(labels, minlength=NUM_CLASSES).double()
        positive_pairs = float((counts * (counts - 1)).sum())
        negative_pairs = float(batch * batch - (counts**2).sum())
        for name in sorted(PML_LOSSES):
            if name == "ntxent" and positive_pairs * negative_pairs > PAIR_MATRIX_LIMIT:
                skipped.append(f"ntxent B={batch}: PML builds a {positive_pairs:.0f} x {negative_pairs:.0f} pair mask ({positive_pairs * negative_pairs:.1e} entries)")
                continue
            wrapped = build_metric_loss(name, num_classes=NUM_CLASSES, embedding_dim=EMBEDDING_DIM).to(device)
            bare = direct_pml(wrapped)
            with torch.no_grad():
                ours_value, ref_value = float(wrapped(embeddings, labels)), float(bare(embeddings, labels))
            same = abs(ours_value - ref_value) <= 1e-6 * max(1.0, abs(ref_value))
            if not same:
                mismatches.append(f"{name} B={batch}: {ours_value} != {ref_value}")
            timing = compare(forward_backward(wrapped, embeddings, labels), forward_backward(bare, embeddings, labels), device, args.rounds)
            rows.append((name, batch, "PML direct", *timing, "yes" if same else "NO"))
            print(f"  measured {name} B={batch}", file=sys.stderr, flush=True)
        ours = build_metric_loss("class_center_triplet", num_classes=NUM_CLASSES, embedding_dim=EMBEDDING_DIM, start_epoch=0).to(device)
        triplet = build_metric_loss("triplet", mining="batch_hard").to(device)
        timing = compare(forward_backward(ours, embeddings, labels), forward_backward(direct_pml(triplet), embeddings, labels), device, args.rounds)
        rows.append(("class_center_triplet", batch, "PML batch-hard triplet", *timing, "n/a"))

    print(f"device: {device}, embedding {EMBEDDING_DIM}, {NUM_CLASSES} classes, median of {args.rounds} interleaved rounds")
    header = f"| {'loss':21} | {'B':>5} | {'reference':22} | {'ours ms':>8} | {'ref ms':>8} | {'time ratio':>10} | {'ours MB':>8} | {'ref MB':>8} | same value |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    overheads = []
    for name, batch, reference, t_ours, t_ref, m_ours, m_ref, same in rows:
        ratio = t_ours / t_ref
        if reference == "PML direct":
            overheads.append(ratio - 1)
        print(
            f"| {name:21} | {batch:>5} | {reference:22} | {t_ours * 1e3:8.2f} | {t_ref * 1e3:8.2f} | {ratio:10.3f} | "
            f"{m_ours:8.1f} | {m_ref:8.1f} | {same:>10} |"
        )
    print(f"wrapper overhead over direct PML: median {statistics.median(overheads):+.1%}, max {max(overheads):+.1%} (target < 5%)")
    for line in skipped:
        print("skipped:", line)
    for line in mismatches:
        print("VALUE MISMATCH:", line)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
