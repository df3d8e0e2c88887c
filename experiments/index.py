"""``medmetric index``: embed labelled images with a trained stage-1 model into a search index.

    medmetric index --model runs/kimia/handoff.json --images data/Training --out runs/kimia/index
    medmetric index --model runs/kimia/handoff.json --images new_class/ --out runs/kimia/index  # appends

A new class is added by indexing its examples: no retraining. Adding to an existing index
appends (images already in it, by path, are skipped) and refuses a different model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medmetric.experiments.image_sources import read_image_sources
from medmetric.retrieval.embedder import EMBEDDINGS, embed_paths, load_embedder
from medmetric.retrieval.index import RetrievalIndex


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmetric index", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="stage-1 handoff.json, its run folder, or a stage-1 .ckpt")
    parser.add_argument("--images", nargs="+", required=True, help="folders of class folders and/or CSVs with path,label")
    parser.add_argument("--out", required=True, help="index folder (created, or appended to)")
    parser.add_argument("--embedding", choices=EMBEDDINGS, default="projector", help="projector (default) or backbone features")
    parser.add_argument("--image_size", type=int, default=None, help="default: the stage-1 run's data.image_size")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk_rows", type=int, default=65536, help="rows per stored chunk (memory while indexing)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> dict:
    images = read_image_sources(args.images)
    unlabelled = images["label"] == ""
    if unlabelled.any():
        raise SystemExit(
            f"medmetric index: {int(unlabelled.sum())} images have no label (e.g. {images['path'][unlabelled].iloc[0]}). "
            "The index needs labels: give a folder of class folders or a CSV with a label column"
        )
    embedder = load_embedder(args.model, args.embedding, args.image_size)
    index = RetrievalIndex.open_or_create(args.out, embedder.fingerprint, embedder.dim, embedder.describe())
    known = set(index.entries["path"]) if index.count else set()
    images["path"] = [str(Path(p).resolve()) if "::" not in p else p for p in images["path"]]
    fresh = images[~images["path"].isin(known)].drop_duplicates("path").reset_index(drop=True)
    skipped = len(images) - len(fresh)
    added = 0
    if len(fresh):
        batches = embed_paths(embedder, fresh["path"].tolist(), args.batch_size, args.num_workers, args.device, not args.quiet)
        added = index.append(batches, fresh["path"].tolist(), fresh["label"].tolist(), args.chunk_rows)
    counts = index.entries["label"].value_counts().sort_index()
    print(f"index {args.out}: added {added} images ({skipped} already indexed or repeated), {index.count} in all, "
          f"{len(counts)} labels, dim {index.dim}, fingerprint {index.manifest['fingerprint'][:12]}")
    return {"added": added, "skipped": skipped, "count": index.count}


def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
