"""``medmetric search``: the indexed cases most similar to query images, and a voted label.

    medmetric search --index runs/kimia/index --query patch.png more_patches/ list.csv --k 10

For each query: the top-k indexed images (label, cosine score, path) and the majority-vote
label among them (ties: larger summed score). Prints a table and writes ``results.csv`` (one
row per query and rank) and ``results.json`` to ``--out`` (default: a new folder
``<index>/searches/<UTC time>/``). When the queries carry labels (class folders, or a CSV label
column), also prints the vote accuracy and Kimia Path24's eta_p, eta_W, eta_total.

The query images are embedded with the model that built the index (recorded in it) or
``--model``; a model whose fingerprint differs from the index's is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from medmetric.experiments.image_sources import read_image_sources
from medmetric.lightning_modules.metrics.kimia import confusion_from_predictions, kimia_accuracies
from medmetric.retrieval.embedder import embed_paths, load_embedder
from medmetric.retrieval.index import BACKENDS, RetrievalIndex, vote
from medmetric.run_io.atomic import write_json_atomic


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmetric search", description=__doc__.split("\n")[0])
    parser.add_argument("--index", required=True, help="index folder made by medmetric index")
    parser.add_argument("--query", nargs="+", required=True, help="image files, folders, or CSVs (path[,label])")
    parser.add_argument("--model", default=None, help="default: the model recorded in the index")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out", default=None, help="output folder (new; default <index>/searches/<UTC time>)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="auto: faiss when installed, else exact torch")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--show", type=int, default=20, help="queries printed in the table")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def search_images(args: argparse.Namespace) -> tuple[pd.DataFrame, list[dict]]:
    """Embed the queries, search, vote: (one row per query and rank, one dict per query)."""
    if args.k < 1:
        raise SystemExit(f"medmetric search: --k must be >= 1, got {args.k}")
    index = RetrievalIndex.open(args.index)
    built = index.manifest["model"]
    embedder = load_embedder(args.model or built["source"], built["embedding"], built["image_size"])
    index.check_fingerprint(embedder.fingerprint, embedder.describe())
    queries = read_image_sources(args.query)
    embeddings = np.concatenate(list(embed_paths(
        embedder, queries["path"].tolist(), args.batch_size, args.num_workers, args.device, not args.quiet, "queries"
    )))
    scores, indices = index.search(embeddings, args.k, backend=args.backend)
    entries = index.entries
    rows, results = [], []
    for q, (path, label) in enumerate(zip(queries["path"], queries["label"], strict=True)):
        hits = entries.iloc[indices[q]]
        voted, votes = vote(hits["label"].tolist(), scores[q].tolist())
        neighbours = [
            {"rank": r + 1, "label": lab, "score": float(s), "path": p}
            for r, (lab, s, p) in enumerate(zip(hits["label"], scores[q], hits["path"], strict=True))
        ]
        results.append({"query": path, "true_label": label or None, "vote": voted, "votes": votes,
                        "k": len(neighbours), "neighbours": neighbours})
        rows += [{"query": path, "true_label": label, "vote": voted, **n} for n in neighbours]
    return pd.DataFrame(rows), results


def summarise(results: list[dict]) -> dict | None:
    """Vote accuracy and Kimia eta measures over the queries that carry a label."""
    labelled = [r for r in results if r["true_label"]]
    if not labelled:
        return None
    classes = sorted({r["true_label"] for r in labelled} | {r["vote"] for r in labelled})
    ids = {c: i for i, c in enumerate(classes)}
    confusion = confusion_from_predictions(
        [ids[r["true_label"]] for r in labelled], [ids[r["vote"]] for r in labelled], len(classes)
    )
    top1 = np.mean([r["neighbours"][0]["label"] == r["true_label"] for r in labelled])
    return {"queries_with_label": len(labelled), "top1_accuracy": float(top1), **kimia_accuracies(confusion)}


def new_output_dir(args: argparse.Namespace) -> Path:
    from medmetric.run_io.run_folders import new_run_dir

    if args.out is None:
        return new_run_dir(Path(args.index) / "searches")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"medmetric search: {out} exists and is not empty; choose a new --out (nothing is overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def print_table(results: list[dict], show: int) -> None:
    print(f"{'query':32s} {'vote':12s} {'votes':>6s}  top neighbours (label score)")
    for r in results[:show]:
        top = ", ".join(f"{n['label']} {n['score']:.3f}" for n in r["neighbours"][:3])
        name = Path(r["query"].split("::")[-1]).name[-32:]
        mark = "" if not r["true_label"] else ("  ok" if r["vote"] == r["true_label"] else f"  (true {r['true_label']})")
        print(f"{name:32s} {r['vote']:12s} {r['votes']:>3d}/{r['k']:<2d}  {top}{mark}")
    if len(results) > show:
        print(f"... {len(results) - show} more queries in the output files")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = new_output_dir(args)
    table, results = search_images(args)
    summary = summarise(results)
    tmp = out / ".results.csv.tmp"
    table.to_csv(tmp, index=False)
    tmp.replace(out / "results.csv")
    write_json_atomic(out / "results.json", {"index": str(Path(args.index).resolve()), "k": args.k,
                                             "vote": "majority (ties: larger summed score)",
                                             "summary": summary, "queries": results})
    print_table(results, args.show)
    if summary:
        print(f"labelled queries {summary['queries_with_label']}: vote accuracy (eta_p) {summary['eta_p']:.4f}, "
              f"eta_W {summary['eta_W']:.4f}, eta_total {summary['eta_total']:.4f}, top-1 {summary['top1_accuracy']:.4f}")
    print(f"wrote {out / 'results.csv'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
