"""Retrieval-metric benchmark: our chunked ``retrieval_metrics`` against PML's AccuracyCalculator.

N embeddings (default 20,000 x 128, 50 long-tailed classes, largest/smallest ~100, with
some class structure), leave-one-out, cosine. Both compute Precision@1 and MAP@R:

* ours: ``retrieval_metrics(emb, labels, k_values=(1, 5, 10))`` (also Recall@5/10);
* PML: ``AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"),
  k="max_bin_count", knn_func=CustomKNN(CosineSimilarity()))``. ``k="max_bin_count"``
  (the largest class count) is what MAP@R needs. PML's default ``knn_func`` is faiss
  (``IndexFlatL2``); without faiss installed its constructor fails (``NameError:
  faiss``), so the torch fallback has to be given explicitly: ``CustomKNN`` computes the
  whole N x N score matrix and one ``torch.topk`` over it (``--pml_batch_size`` makes it
  use PML's ``BatchedDistance`` instead).

Prints the best wall time of ``--rounds`` alternating runs, peak memory (CPU: growth of the process's peak resident set, Linux
``VmHWM`` reset via ``/proc/self/clear_refs``; CUDA: ``max_memory_allocated``) and the
ratios, and exits non-zero unless the values agree. Agreement is to ``--tol`` (1e-6), not
bitwise: at this N, float32 scores have exact ties (about N^2 / 2^24 per row), which
either ``torch.topk`` call may order differently; the neighbour lists are otherwise
identical (see ``tests/test_retrieval.py`` for exact agreement on tie-free data).

    python -m bench.retrieval [--n 20000] [--classes 50] [--device cpu]

``--mode index`` (``make bench-retrieval``) benchmarks the search index instead
(``lightning_modules/retrieval_index.py``): ``--index_n`` (100,000) L2-normalised 128-d vectors
appended to an on-disk index in chunks, then ``--queries`` (1,000) searched at k=10 by faiss
``IndexFlatIP`` and by the exact chunked torch search, in the same run: build seconds
(faiss: read the chunks and fill the flat index; torch: nothing to build, it reads the
memory-mapped chunks at search time), queries per second (best of ``--rounds``), and whether
both return the same top-k (the same neighbour sets per query; rows that differ are counted
and are due only to equal float32 scores if the scores still agree to ``--tol``).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

from bench.metric_losses import peak_memory_mb
from medmetric.lightning_modules.metrics import retrieval_metrics
from medmetric.retrieval.index import RetrievalIndex, build_faiss_flat


def make_data(n: int, dim: int, classes: int, imbalance: float, seed: int):
    """Long-tailed labels (class c has weight imbalance^(-c/(C-1))), noisy class centres."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.tensor([imbalance ** (-c / max(classes - 1, 1)) for c in range(classes)])
    labels = torch.multinomial(weights / weights.sum(), n, replacement=True, generator=g)
    centres = torch.randn(classes, dim, generator=g)
    embeddings = centres[labels] * 0.35 + torch.randn(n, dim, generator=g)
    return embeddings, labels


def timed(fn, device: torch.device) -> tuple[dict, float, float]:
    """Result, seconds and peak MB of one call."""
    box: dict = {}

    def step():
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        box["result"] = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        box["seconds"] = time.perf_counter() - start

    peak = peak_memory_mb(step, device)
    return box["result"], box["seconds"], peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument(
        "--imbalance", type=float, default=100.0, help="largest/smallest class weight"
    )
    parser.add_argument("--distance", choices=["cosine", "euclidean"], default="cosine")
    parser.add_argument("--chunk_size", type=int, default=1024)
    parser.add_argument(
        "--pml_batch_size",
        type=int,
        default=None,
        help="PML CustomKNN batch_size (default: whole matrix)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--rounds", type=int, default=2, help="timed runs of each (best is shown)")
    parser.add_argument("--mode", choices=["metrics", "index"], default="metrics", help="metrics: ours vs PML; index: faiss vs torch search")
    parser.add_argument("--index_n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--chunk_rows", type=int, default=65536, help="rows per index chunk on disk")
    args = parser.parse_args(argv)
    if args.mode == "index":
        return index_benchmark(args)

    device = torch.device(args.device)
    embeddings, labels = make_data(args.n, args.dim, args.classes, args.imbalance, args.seed)
    embeddings, labels = embeddings.to(device), labels.to(device)
    counts = torch.bincount(labels)
    print(
        f"N={args.n} dim={args.dim} classes={int((counts > 0).sum())} "
        f"(largest {int(counts.max())}, smallest {int(counts[counts > 0].min())}) "
        f"{args.distance}, leave-one-out, device={device}, torch threads={torch.get_num_threads()}"
    )

    def ours():
        return retrieval_metrics(
            embeddings,
            labels,
            k_values=(1, 5, 10),
            distance=args.distance,
            chunk_size=args.chunk_size,
        )

    distance = (
        CosineSimilarity() if args.distance == "cosine" else LpDistance(normalize_embeddings=False)
    )
    calculator = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        k="max_bin_count",
        knn_func=CustomKNN(distance, batch_size=args.pml_batch_size),
        device=device,
    )

    def pml():
        return calculator.get_accuracy(embeddings, labels)

    retrieval_metrics(embeddings[:256], labels[:256], chunk_size=64)  # warm-up
    # Alternate the two so that load from other processes hits both alike; keep the best.
    # Peak memory is that of the first round (later ones reuse memory already mapped).
    got, our_s, our_mb = timed(ours, device)
    ref, pml_s, pml_mb = timed(pml, device)
    for _ in range(args.rounds - 1):
        our_s = min(our_s, timed(ours, device)[1])
        pml_s = min(pml_s, timed(pml, device)[1])

    rows = [("ours (chunked topk)", our_s, our_mb), ("PML AccuracyCalculator", pml_s, pml_mb)]
    print(f"{'':24s} {'seconds':>9s} {'peak MB':>9s}   (best of {args.rounds})")
    for name, sec, mb in rows:
        print(f"{name:24s} {sec:9.2f} {mb:9.0f}")
    memory_ratio = f"{pml_mb / our_mb:8.1f}x" if our_mb >= 1 else f"{'-':>9s}"
    print(f"{'PML / ours':24s} {pml_s / our_s:8.1f}x {memory_ratio}")

    pairs = [
        ("precision_at_1", got["precision_at_1"], ref["precision_at_1"]),
        ("map_at_r", got["map_at_r"], ref["mean_average_precision_at_r"]),
    ]
    print(f"\n{'metric':16s} {'ours':>20s} {'PML':>20s} {'|diff|':>10s}")
    ok = True
    for name, a, b in pairs:
        diff = abs(a - b)
        ok &= diff <= args.tol
        print(f"{name:16s} {a:20.15f} {b:20.15f} {diff:10.2e}")
    print(f"{'recall_at_5':16s} {got['recall_at_5']:20.15f}")
    print(f"{'recall_at_10':16s} {got['recall_at_10']:20.15f}")
    if got["recall_at_1"] != got["precision_at_1"]:
        ok = False
    print("values agree" if ok else f"VALUES DIFFER (tolerance {args.tol})")
    return 0 if ok else 1


def index_benchmark(args) -> int:
    """faiss IndexFlatIP vs exact chunked torch search over the same on-disk index."""
    import tempfile

    import numpy as np

    vectors, _ = make_data(args.index_n + args.queries, args.dim, args.classes, args.imbalance, args.seed)
    vectors = torch.nn.functional.normalize(vectors, dim=1).numpy()
    reference, queries = vectors[: args.index_n], vectors[args.index_n :]
    print(f"index: N={args.index_n} x dim={args.dim} float32 (L2-normalised), {args.queries} queries, k={args.k}, "
          f"chunks of {args.chunk_rows} rows, torch threads={torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        index = RetrievalIndex.create(tmp, "bench", args.dim, {"source": "bench"})
        start = time.perf_counter()
        paths = [f"/bench/{i}" for i in range(args.index_n)]
        index.append((reference[i : i + 4096] for i in range(0, args.index_n, 4096)), paths, ["x"] * args.index_n, args.chunk_rows)
        append_s = time.perf_counter() - start
        start = time.perf_counter()
        flat = build_faiss_flat(array for _, array in index.chunk_arrays())
        faiss_build_s = time.perf_counter() - start
        index._faiss = flat  # the index searches this one (built above, timed as the build)

        def run(backend):
            best, result = float("inf"), None
            for _ in range(args.rounds):
                start = time.perf_counter()
                result = index.search(queries, args.k, backend=backend)
                best = min(best, time.perf_counter() - start)
            return result, best

        (f_scores, f_idx), faiss_s = run("faiss")
        (t_scores, t_idx), torch_s = run("torch")
    same_rows = np.array([set(a) == set(b) for a, b in zip(f_idx, t_idx, strict=True)])
    score_diff = float(np.abs(np.sort(f_scores, 1) - np.sort(t_scores, 1)).max())
    print(f"append to the on-disk index (shared by both): {append_s:.2f} s")
    print(f"{'backend':28s} {'build s':>8s} {'search s':>9s} {'queries/s':>10s}   (search: best of {args.rounds})")
    print(f"{'faiss IndexFlatIP':28s} {faiss_build_s:8.2f} {faiss_s:9.3f} {args.queries / faiss_s:10.0f}")
    print(f"{'torch exact, chunked':28s} {0.0:8.2f} {torch_s:9.3f} {args.queries / torch_s:10.0f}")
    print(f"{'torch / faiss time':28s} {'':8s} {torch_s / faiss_s:8.2f}x")
    same = bool(same_rows.all())
    print(f"same top-{args.k}: {'yes' if same else 'no'} ({int(same_rows.sum())}/{len(same_rows)} queries identical; "
          f"max |score diff| {score_diff:.1e})")
    if not same and score_diff <= args.tol:
        print("rows that differ do so only among equal-score neighbours (scores agree)")
    return 0 if same or score_diff <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
