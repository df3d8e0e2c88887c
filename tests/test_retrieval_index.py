"""Retrieval index and ``medmetric index`` / ``medmetric search``: exact search against brute
force, build / append / search round trip, crash-safe appends, refusal of another model, and
open-set retrieval of classes never seen in training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medmetric.datamodules.synthetic_histopathology import write_patch_folders
from medmetric.experiments.cli import main
from medmetric.experiments.retrieval_eval import nearest_label_accuracies
from medmetric.lightning_modules.metrics.retrieval import merge_top_k, top_k_inner_product
from medmetric.retrieval.embedder import EmbedderError, load_embedder
from medmetric.retrieval.index import RetrievalIndex, RetrievalIndexError, vote
from tests.conftest import make_stage1_handoff


def _unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(queries: np.ndarray, reference: np.ndarray, k: int):
    """Every score by a Python loop, then a full sort."""
    scores, indices = [], []
    for q in queries:
        row = np.array([float(np.dot(q.astype(np.float64), r.astype(np.float64))) for r in reference])
        order = np.argsort(-row, kind="stable")[:k]
        scores.append(row[order])
        indices.append(order)
    return np.array(scores), np.array(indices)


def test_chunked_top_k_and_merge_match_brute_force():
    reference, queries = _unit(300, 8, 0), _unit(17, 8, 1)
    ref_scores, ref_indices = _brute_force(queries, reference, 7)
    s, i = top_k_inner_product(torch.from_numpy(queries), torch.from_numpy(reference), 7, chunk_size=5)
    np.testing.assert_array_equal(i.numpy(), ref_indices)
    np.testing.assert_allclose(s.numpy(), ref_scores, atol=1e-6)
    best_s, best_i = torch.full((17, 0), -np.inf), torch.zeros((17, 0), dtype=torch.long)
    for start in range(0, 300, 64):  # reference chunks, as the index searches its chunk files
        s, i = top_k_inner_product(torch.from_numpy(queries), torch.from_numpy(reference[start : start + 64]), 7)
        best_s, best_i = merge_top_k(best_s, best_i, s, i + start, 7)
    np.testing.assert_array_equal(best_i.numpy(), ref_indices)


def test_leave_one_out_nearest_label_matches_a_loop():
    emb, labels = _unit(60, 4, 2), np.random.default_rng(3).integers(0, 3, 60)
    correct = np.zeros(3)
    total = np.bincount(labels, minlength=3)
    for q in range(60):
        others = [r for r in range(60) if r != q]
        nearest = max(others, key=lambda r: float(np.dot(emb[q], emb[r])))
        correct[labels[q]] += labels[nearest] == labels[q]
    got = nearest_label_accuracies(torch.from_numpy(emb), torch.from_numpy(labels))
    assert got["eta_p"] == pytest.approx(correct.sum() / 60)
    assert got["eta_W"] == pytest.approx(np.mean(correct / total))


def test_vote_is_majority_with_summed_score_tie_break():
    assert vote(["a", "b", "b", "a", "c"], [0.9, 0.8, 0.7, 0.5, 0.95]) == ("b", 2)  # 2 votes each: b sums 1.5 > a 1.4
    assert vote(["a", "b", "b"], [0.99, 0.5, 0.4]) == ("b", 2)
    assert vote(["a", "b"], [0.5, 0.6]) == ("b", 1)


def _fill(index: RetrievalIndex, vectors: np.ndarray, labels: list[str], start: int, chunk_rows: int, batch: int = 7):
    paths = [f"/img/{start + i}.png" for i in range(len(vectors))]
    return index.append((vectors[i : i + batch] for i in range(0, len(vectors), batch)), paths, labels, chunk_rows)


def test_index_build_append_search_round_trip(tmp_path):
    first, second = _unit(50, 16, 4), _unit(33, 16, 5)
    index = RetrievalIndex.create(tmp_path / "idx", "fp", 16, {"source": "m", "embedding": "projector", "image_size": 32})
    assert _fill(index, first, ["a"] * 25 + ["b"] * 25, 0, chunk_rows=20) == 50
    assert len(index.manifest["chunks"]) == 3  # 21 + 21 + 8 rows (batches of 7 flushed at >= 20)
    reopened = RetrievalIndex.open(tmp_path / "idx")
    assert _fill(reopened, second, ["c"] * 33, 50, chunk_rows=1000) == 33
    again = RetrievalIndex.open(tmp_path / "idx")
    assert again.count == 83
    assert again.entries["path"].tolist() == [f"/img/{i}.png" for i in range(83)]  # old entries kept, in order
    assert again.entries["label"].tolist() == ["a"] * 25 + ["b"] * 25 + ["c"] * 33
    everything = np.concatenate([first, second])
    queries = _unit(9, 16, 6)
    ref_scores, ref_indices = _brute_force(queries, everything, 10)
    for backend in ("torch", "faiss"):
        scores, indices = again.search(queries, 10, backend=backend)
        np.testing.assert_array_equal(indices, ref_indices)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    scores, indices = again.search(everything[[3, 60]], 1, backend="torch")  # an indexed vector finds itself
    assert indices[:, 0].tolist() == [3, 60] and np.allclose(scores[:, 0], 1.0, atol=1e-6)
    assert again.search(queries, 500, backend="torch")[1].shape == (9, 83)  # k capped at the count
    with pytest.raises(RetrievalIndexError, match="dim 16"):
        again.search(_unit(2, 8, 0), 3)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(RetrievalIndexError, match="not empty and holds no index"):
        RetrievalIndex.create(tmp_path / "user", "fp", 16, {})


def test_a_crash_mid_append_leaves_the_old_index_usable(tmp_path):
    index = RetrievalIndex.create(tmp_path / "idx", "fp", 16, {"source": "m"})
    _fill(index, _unit(30, 16, 7), ["a"] * 30, 0, chunk_rows=10)
    manifest_before = (tmp_path / "idx" / "manifest.json").read_text()

    def crashing_batches():
        yield _unit(12, 16, 8)  # flushed as a chunk file...
        raise KeyboardInterrupt  # ...then the process dies before the manifest is replaced

    with pytest.raises(KeyboardInterrupt):
        RetrievalIndex.open(tmp_path / "idx").append(crashing_batches(), [f"/new/{i}" for i in range(24)], ["b"] * 24, 10)
    assert (tmp_path / "idx" / "manifest.json").read_text() == manifest_before
    assert len(list((tmp_path / "idx" / "chunks").glob("*.npy"))) == 4  # the orphan exists but is not listed
    survivor = RetrievalIndex.open(tmp_path / "idx")
    assert survivor.count == 30 and set(survivor.entries["label"]) == {"a"}
    assert survivor.search(_unit(2, 16, 9), 30, backend="torch")[1].max() < 30


@pytest.fixture(scope="module")
def patches(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("patches")
    write_patch_folders(root / "base", ["adipose", "stroma"], per_class=4, patch_size=24, seed=0, n_styles=3)
    write_patch_folders(root / "added", ["tumour"], per_class=4, patch_size=24, seed=1, style_offset=2, n_styles=3)
    return root


def _handoff(folder: Path, classes) -> Path:
    folder.mkdir(parents=True)
    return make_stage1_handoff(folder, classes)


def _index_cli(model, images, out, *extra):
    return main(["index", "--model", str(model), "--images", *map(str, images), "--out", str(out), "--image_size", "32", "--quiet", *extra])


def test_cli_index_append_and_search(tmp_path, patches, capsys):
    model = _handoff(tmp_path / "m", ["adipose", "stroma"])
    with pytest.raises(SystemExit) as exit_:
        _index_cli(model, [patches / "base"], tmp_path / "idx")
    assert exit_.value.code == 0
    with pytest.raises(SystemExit):
        _index_cli(model, [patches / "added", patches / "base"], tmp_path / "idx")  # base again: skipped
    assert "added 4 images (8 already indexed" in capsys.readouterr().out
    index = RetrievalIndex.open(tmp_path / "idx")
    assert index.count == 12 and sorted(index.entries["label"].unique()) == ["adipose", "stroma", "tumour"]

    query = patches / "added" / "tumour" / "tumour_0002.png"
    with pytest.raises(SystemExit) as exit_:
        main(["search", "--index", str(tmp_path / "idx"), "--query", str(query), "--k", "3", "--out", str(tmp_path / "s"), "--quiet"])
    assert exit_.value.code == 0
    table = pd.read_csv(tmp_path / "s" / "results.csv")
    assert list(table.columns) == ["query", "true_label", "vote", "rank", "label", "score", "path"]
    assert table["rank"].tolist() == [1, 2, 3]
    assert table["path"].iloc[0] == str(query.resolve()) and table["score"].iloc[0] == pytest.approx(1.0, abs=1e-5)
    result = json.loads((tmp_path / "s" / "results.json").read_text())["queries"][0]
    assert result["vote"] == vote(table["label"].tolist(), table["score"].tolist())[0]
    assert "tumour_0002.png" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not empty"):  # never overwrites an earlier search
        main(["search", "--index", str(tmp_path / "idx"), "--query", str(query), "--out", str(tmp_path / "s")])


def test_another_model_is_refused_with_how_to_rebuild(tmp_path, patches):
    model = _handoff(tmp_path / "m1", ["adipose", "stroma"])
    other = _handoff(tmp_path / "m2", ["adipose", "stroma"])  # other random weights
    with pytest.raises(SystemExit):
        _index_cli(model, [patches / "base"], tmp_path / "idx")
    query = str(patches / "base" / "stroma" / "stroma_0000.png")
    with pytest.raises(RetrievalIndexError, match="built by another model.*medmetric index --model"):
        main(["search", "--index", str(tmp_path / "idx"), "--query", query, "--model", str(other), "--quiet"])
    with pytest.raises(RetrievalIndexError, match="built by another model"):
        _index_cli(other, [patches / "added"], tmp_path / "idx")
    with pytest.raises(RetrievalIndexError, match="built by another model"):  # same weights, other embedding
        _index_cli(model, [patches / "added"], tmp_path / "idx", "--embedding", "backbone")
    assert RetrievalIndex.open(tmp_path / "idx").count == 8
    assert load_embedder(model, image_size=32).fingerprint != load_embedder(model, image_size=64).fingerprint
    with pytest.raises(EmbedderError, match="--image_size"):
        load_embedder(model)


def test_index_needs_labels(tmp_path, patches):
    model = _handoff(tmp_path / "m", ["adipose", "stroma"])
    with pytest.raises(SystemExit, match="no label"):
        _index_cli(model, [patches / "base" / "adipose"], tmp_path / "idx")  # loose images only
    assert not (tmp_path / "idx" / "manifest.json").exists()


@pytest.mark.slow
def test_open_set_classes_only_in_the_index_are_retrieved_and_voted(tmp_path):
    """Train on 5 tissue classes, index 7 (2 never seen in training), query the unseen two."""
    names = [f"tissue{i}" for i in range(7)]
    write_patch_folders(tmp_path / "train", names[:5], per_class=16, patch_size=32, seed=0, n_styles=7)
    write_patch_folders(tmp_path / "gallery", names, per_class=8, patch_size=32, seed=1, n_styles=7)
    write_patch_folders(tmp_path / "query", names[5:], per_class=6, patch_size=32, seed=2, style_offset=5, n_styles=7)
    runs = tmp_path / "runs"
    main([
        "fit", "--config", "experiments/kimia_path24/stage1.yaml",
        "--data=medmetric.datamodules.histopathology.PatchFolderDataModule", f"--data.data_dir={tmp_path / 'train'}",
        f"--runs_dir={runs}", "--experiment=open", "--model.backbone=test_resnet", "--data.image_size=32",
        "--data.batch_size=20", "--data.m_per_class=4", "--trainer.max_epochs=3", "--wandb=disabled",
        "--test_after_fit=false",
    ])
    handoff = runs / "open" / "handoff.json"
    stage1_classes = json.loads(handoff.read_text())["class_names"]
    assert stage1_classes == names[:5]
    best = json.loads(handoff.read_text())["checkpoint"]
    # the checkpoint and the manifest are the same model: same fingerprint
    assert load_embedder((handoff.parent / best).resolve()).fingerprint == load_embedder(handoff).fingerprint
    with pytest.raises(SystemExit):
        main(["index", "--model", str(handoff), "--images", str(tmp_path / "gallery"), "--out", str(tmp_path / "idx"), "--quiet"])
    with pytest.raises(SystemExit):
        main(["search", "--index", str(tmp_path / "idx"), "--query", str(tmp_path / "query"), "--k", "5",
              "--out", str(tmp_path / "s"), "--quiet"])
    results = json.loads((tmp_path / "s" / "results.json").read_text())
    queries = results["queries"]
    assert {q["true_label"] for q in queries} == set(names[5:])
    voted = np.mean([q["vote"] == q["true_label"] for q in queries])
    top1 = np.mean([q["neighbours"][0]["label"] == q["true_label"] for q in queries])
    assert voted >= 0.8 and top1 >= 0.8, (voted, top1)
    assert results["summary"]["eta_p"] == pytest.approx(voted)


def test_csv_sources_with_hdf5_patches_and_retrieval_eval(tmp_path):
    """Index and query CSVs listing HDF5 patch references; retrieval_eval's values against a loop."""
    from medmetric.datamodules.synthetic_histopathology import write_kimia_hdf5
    from medmetric.experiments import retrieval_eval

    h5 = write_kimia_hdf5(tmp_path / "k.h5", scan_patches=(2, 2), n_test=1, patch_size=16, n_classes=3)
    refs = pd.DataFrame({"path": [f"{h5}::test_data/patches[{i}]" for i in range(3)], "label": ["s0", "s1", "s2"]})
    refs.to_csv(tmp_path / "refs.csv", index=False)
    refs[["path"]].iloc[[1]].to_csv(tmp_path / "query.csv", index=False)  # unlabelled query
    model = _handoff(tmp_path / "m", ["s0", "s1"])
    with pytest.raises(SystemExit):
        _index_cli(model, [tmp_path / "refs.csv"], tmp_path / "idx")
    with pytest.raises(SystemExit):
        main(["search", "--index", str(tmp_path / "idx"), "--query", str(tmp_path / "query.csv"), "--k", "1",
              "--out", str(tmp_path / "s"), "--quiet"])
    result = json.loads((tmp_path / "s" / "results.json").read_text())
    assert result["summary"] is None and result["queries"][0]["true_label"] is None
    assert result["queries"][0]["neighbours"][0]["path"] == refs["path"][1]

    # retrieval_eval on class folders: leave-one-out and test-vs-train values against a loop
    write_patch_folders(tmp_path / "test", ["a", "b"], per_class=5, patch_size=24, seed=3)
    write_patch_folders(tmp_path / "train", ["a", "b"], per_class=6, patch_size=24, seed=4)
    assert retrieval_eval.main(["--model", str(model), "--image_size", "32", "--test", str(tmp_path / "test"),
                                "--train", str(tmp_path / "train"), "--quiet", "--out", str(tmp_path / "r.json")]) == 0
    got = json.loads((tmp_path / "r.json").read_text())
    embedder = load_embedder(model, image_size=32)
    from medmetric.retrieval.embedder import embed_paths

    def embedded(folder):
        paths = sorted(str(p) for p in Path(folder).glob("*/*.png"))
        return np.concatenate(list(embed_paths(embedder, paths, progress=False))), [Path(p).parent.name for p in paths]

    test_emb, test_y = embedded(tmp_path / "test")
    train_emb, train_y = embedded(tmp_path / "train")
    loo_hits, vs_hits = [], []
    for q in range(len(test_y)):
        sims = test_emb @ test_emb[q]
        sims[q] = -np.inf
        loo_hits.append(test_y[int(np.argmax(sims))] == test_y[q])
        vs_hits.append(train_y[int(np.argmax(train_emb @ test_emb[q]))] == test_y[q])
    assert got["precision_at_1"] == pytest.approx(np.mean(loo_hits))
    assert got["loo_eta_p"] == pytest.approx(np.mean(loo_hits))
    assert got["vs_train_eta_p"] == pytest.approx(np.mean(vs_hits))
    per_class = [np.mean([h for h, y in zip(vs_hits, test_y, strict=True) if y == c]) for c in ("a", "b")]
    assert got["vs_train_eta_W"] == pytest.approx(np.mean(per_class))
    assert got["recall_at_10"] == 1.0  # 9 other test images, both classes among them
