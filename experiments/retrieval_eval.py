"""Retrieval evaluation of a stage-1 model: leave-one-out kNN on a test set, and Kimia's measures.

    python -m medmetric.experiments.retrieval_eval --model runs/kimia/handoff.json --kimia ../shared/data/kimia_path24
    python -m medmetric.experiments.retrieval_eval --model runs/x/handoff.json --test patches/test/   # any labelled set

Leave-one-out on the test set (each test image queries all the others): Precision@1,
Recall@1/5/10 and MAP@R (``medmetric.lightning_modules.metrics.retrieval``). Kimia Path24 measures
eta_p, eta_W, eta_total (``medmetric.lightning_modules.metrics.kimia``) of the 1-NN label, two ways:
leave-one-out within the test set, and the data set's protocol, each test patch searched
among the training patches (``--kimia``, or ``--train`` for any labelled set).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from medmetric.experiments.image_sources import read_image_sources
from medmetric.lightning_modules.metrics.kimia import confusion_from_predictions, kimia_accuracies
from medmetric.lightning_modules.metrics.retrieval import retrieval_metrics, top_k_inner_product
from medmetric.retrieval.embedder import EMBEDDINGS, embed_paths, load_embedder
from medmetric.run_io.atomic import write_json_atomic


def nearest_label_accuracies(query, query_labels, reference=None, reference_labels=None) -> dict[str, float]:
    """Kimia measures of the 1-NN label (leave-one-out when no reference is given)."""
    loo = reference is None
    reference, reference_labels = (query, query_labels) if loo else (reference, reference_labels)
    _, nearest = top_k_inner_product(query, reference, 1, exclude_self=loo)
    predicted = reference_labels[nearest[:, 0]]
    num_classes = int(max(query_labels.max(), reference_labels.max())) + 1
    return kimia_accuracies(confusion_from_predictions(query_labels, predicted, num_classes))


def embed(embedder, paths, args) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(list(embed_paths(embedder, paths, args.batch_size, args.num_workers, args.device, not args.quiet))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medmetric.experiments.retrieval_eval", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="stage-1 handoff.json, its run folder, or a .ckpt")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--kimia", help="Kimia Path24 folder or HDF5 (official train/test split)")
    source.add_argument("--test", nargs="+", help="labelled test images: class folders or CSV path,label")
    parser.add_argument("--train", nargs="+", help="labelled references for the test-vs-train measures")
    parser.add_argument("--patch_size", type=int, default=1000, help="Kimia HDF5: training patch size cut from scans")
    parser.add_argument("--embedding", choices=EMBEDDINGS, default="projector")
    parser.add_argument("--image_size", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write the values to this JSON file (must not exist)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    if args.kimia:
        from medmetric.datamodules.histopathology import KimiaPath24DataModule

        table = KimiaPath24DataModule(args.kimia, patch_size=args.patch_size).read_index()
        test, train = table[table["split"] == "test"], table[table["split"] == "train"]
    else:
        test = read_image_sources(args.test)
        train = read_image_sources(args.train) if args.train else None
    classes = sorted(set(test["label"]) | (set(train["label"]) if train is not None else set()))
    ids = {c: i for i, c in enumerate(classes)}
    embedder = load_embedder(args.model, args.embedding, args.image_size)
    test_emb = embed(embedder, test["path"].tolist(), args)
    test_y = torch.tensor([ids[c] for c in test["label"]])
    values = {"test_images": len(test), "classes": len(classes), "embedding": args.embedding,
              **retrieval_metrics(test_emb, test_y, k_values=(1, 5, 10))}
    values.update({f"loo_{k}": v for k, v in nearest_label_accuracies(test_emb, test_y).items()})
    if train is not None:
        train_emb = embed(embedder, train["path"].tolist(), args)
        train_y = torch.tensor([ids[c] for c in train["label"]])
        values["train_images"] = len(train)
        values.update({f"vs_train_{k}": v for k, v in nearest_label_accuracies(test_emb, test_y, train_emb, train_y).items()})
    width = max(map(len, values))
    for key, value in values.items():
        print(f"{key:{width}s}  {value:.4f}" if isinstance(value, float) else f"{key:{width}s}  {value}")
    if args.out:
        out = Path(args.out)
        if out.exists():
            raise SystemExit(f"{out} exists; choose another --out (nothing is overwritten)")
        write_json_atomic(out, {"model": embedder.describe(), **values})
    return 0


if __name__ == "__main__":
    sys.exit(main())
