"""A persistent, appendable nearest-neighbour index of image embeddings (search by image).

On disk (``<dir>/``)::

    manifest.json          format, model fingerprint and description, dim, count, metric, chunk list
    chunks/<id>.npy        float32 (n, dim) L2-normalised embeddings, one file per appended chunk
    chunks/<id>.csv        path,label of the same rows

Writes are atomic: an append writes new chunk files first and then replaces ``manifest.json``
(tmp + ``os.replace``); readers only see chunks the manifest lists, so a crash mid-append leaves
the previous index intact (its unlisted chunk files are ignored). Nothing holds all vectors
while building: chunks of ``chunk_rows`` are flushed as embeddings stream in.

Search is exact inner product (= cosine on the L2-normalised embeddings): faiss
``IndexFlatIP`` when faiss is importable, else (or ``backend="torch"``) a chunked torch
search over the memory-mapped chunks with a running top-k, never more than
``query_block x chunk`` scores at once. Both return the same neighbours up to ties of equal
float32 scores. The faiss index is built in memory from the chunks when an index is loaded
(a flat index has nothing to train: building is one copy of the vectors).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medmetric.lightning_modules.metrics.retrieval import merge_top_k, top_k_inner_product
from medmetric.run_io.atomic import atomic_write, write_json_atomic

INDEX_FORMAT = "medmetric-index/1"
BACKENDS = ("auto", "faiss", "torch")


class RetrievalIndexError(ValueError):
    """A missing, malformed or mismatched index."""


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class RetrievalIndex:
    """Embeddings + labels + paths of indexed images, tied to one model fingerprint."""

    def __init__(self, folder: str | Path, manifest: dict):
        self.folder = Path(folder)
        self.manifest = manifest
        self._entries: pd.DataFrame | None = None
        self._faiss = None

    # --- open / create -------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | Path) -> RetrievalIndex:
        folder = Path(folder)
        path = folder / "manifest.json"
        if not path.is_file():
            raise RetrievalIndexError(f"no index at {folder} (no manifest.json). Build one first: medmetric index --model ... --images ... --out {folder}")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RetrievalIndexError(f"{path} is not valid JSON ({err}); rebuild the index with medmetric index") from err
        if manifest.get("format") != INDEX_FORMAT:
            raise RetrievalIndexError(f"{path} is not a medmetric index manifest (format {INDEX_FORMAT!r})")
        for chunk in manifest["chunks"]:
            for key in ("embeddings", "entries"):
                if not (folder / chunk[key]).is_file():
                    raise RetrievalIndexError(f"{folder}: chunk file {chunk[key]} listed in manifest.json is missing; rebuild the index")
        return cls(folder, manifest)

    @classmethod
    def create(cls, folder: str | Path, fingerprint: str, dim: int, model: dict) -> RetrievalIndex:
        folder = Path(folder)
        if (folder / "manifest.json").exists():
            raise RetrievalIndexError(f"{folder} already holds an index; open it to append")
        if folder.is_dir() and any(folder.iterdir()):
            raise RetrievalIndexError(f"{folder} exists, is not empty and holds no index; choose a new --out folder")
        manifest = {
            "format": INDEX_FORMAT, "fingerprint": fingerprint, "model": model, "dim": int(dim),
            "count": 0, "metric": "inner product of L2-normalised embeddings (cosine)", "chunks": [],
        }
        return cls(folder, manifest)

    @classmethod
    def open_or_create(cls, folder: str | Path, fingerprint: str, dim: int, model: dict) -> RetrievalIndex:
        if (Path(folder) / "manifest.json").exists():
            index = cls.open(folder)
            index.check_fingerprint(fingerprint, model)
            return index
        return cls.create(folder, fingerprint, dim, model)

    def check_fingerprint(self, fingerprint: str, model: dict) -> None:
        """Refuse a model other than the one that built the index, saying how to rebuild."""
        if fingerprint == self.manifest["fingerprint"]:
            return
        built = self.manifest["model"]
        raise RetrievalIndexError(
            f"index {self.folder} was built by another model: {built.get('source')} "
            f"(embedding {built.get('embedding')}, {built.get('image_size')} px, fingerprint "
            f"{self.manifest['fingerprint'][:12]}); this one is {model.get('source')} (embedding "
            f"{model.get('embedding')}, {model.get('image_size')} px, fingerprint {fingerprint[:12]}). "
            "Embeddings of different models are not comparable. Use the model that built the index, "
            f"or rebuild it for this model: medmetric index --model {model.get('source')} "
            f"--embedding {model.get('embedding')} --images <the indexed images> --out <new folder>"
        )

    # --- contents --------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def entries(self) -> pd.DataFrame:
        """path, label of every indexed row, in index order."""
        if self._entries is None:
            parts = [pd.read_csv(self.folder / c["entries"], dtype=str, keep_default_na=False) for c in self.manifest["chunks"]]
            self._entries = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["path", "label"])
        return self._entries

    def chunk_arrays(self) -> Iterable[tuple[int, np.ndarray]]:
        """(offset, memory-mapped (n, dim) float32 array) per chunk."""
        offset = 0
        for chunk in self.manifest["chunks"]:
            array = np.load(self.folder / chunk["embeddings"], mmap_mode="r")
            yield offset, array
            offset += array.shape[0]

    # --- append ----------------------------------------------------------------------------
    def append(
        self, batches: Iterable[np.ndarray], paths: list[str], labels: list[str], chunk_rows: int = 65536
    ) -> int:
        """Add the embeddings streamed by ``batches`` (rows in ``paths`` order); returns rows added.

        The manifest is replaced once, after every chunk file is written.
        """
        if len(paths) != len(labels):
            raise ValueError("paths and labels differ in length")
        chunks_dir = self.folder / "chunks"
        chunks_dir.mkdir(parents=True, exist_ok=True)
        new_chunks, buffer, written = [], [], 0

        def flush():
            nonlocal buffer, written
            block = np.concatenate(buffer).astype(np.float32, copy=False)
            buffer = []
            rows = slice(written, written + len(block))
            new_chunks.append(self._write_chunk(chunks_dir, block, paths[rows], labels[rows]))
            written += len(block)

        buffered = 0
        for batch in batches:
            batch = np.asarray(batch, dtype=np.float32)
            if batch.ndim != 2 or batch.shape[1] != self.dim:
                raise RetrievalIndexError(f"embeddings of shape {batch.shape} do not fit index dim {self.dim}")
            buffer.append(batch)
            buffered += len(batch)
            if buffered >= chunk_rows:
                flush()
                buffered = 0
        if buffer:
            flush()
        if written != len(paths):
            raise RetrievalIndexError(f"{written} embeddings for {len(paths)} images; nothing was added")
        manifest = dict(self.manifest)
        manifest["chunks"] = self.manifest["chunks"] + new_chunks
        manifest["count"] = self.count + written
        manifest["updated"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        write_json_atomic(self.folder / "manifest.json", manifest)
        self.manifest, self._entries, self._faiss = manifest, None, None
        return written

    @staticmethod
    def _write_chunk(folder: Path, block: np.ndarray, paths, labels) -> dict:
        name = f"{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
        emb, ent = folder / f"{name}.npy", folder / f"{name}.csv"
        atomic_write(emb, lambda handle: np.save(handle, block), what="index chunk")
        entries = pd.DataFrame({"path": list(paths), "label": list(labels)}).to_csv(index=False)
        atomic_write(ent, lambda handle: handle.write(entries.encode()), what="index chunk entries")
        return {"embeddings": f"chunks/{emb.name}", "entries": f"chunks/{ent.name}", "count": int(len(block))}

    # --- search ----------------------------------------------------------------------------
    def search(
        self, queries: np.ndarray, k: int, backend: str = "auto", query_block: int = 1024
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, row indices) of each query, best first; ``k`` is capped at ``count``."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid: {list(BACKENDS)}")
        if self.count == 0:
            raise RetrievalIndexError(f"index {self.folder} is empty; add images with medmetric index")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise RetrievalIndexError(f"queries of shape {queries.shape} do not fit index dim {self.dim}")
        k = min(int(k), self.count)
        if backend == "faiss" or (backend == "auto" and faiss_available()):
            return self._search_faiss(queries, k)
        return self._search_torch(queries, k, query_block)

    def _search_faiss(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not faiss_available():
            raise RetrievalIndexError("faiss is not installed: pip install faiss-cpu, or use --backend torch (same results)")
        if self._faiss is None:
            self._faiss = build_faiss_flat(array for _, array in self.chunk_arrays())
        scores, indices = self._faiss.search(queries, k)
        return scores, indices.astype(np.int64)

    def _search_torch(self, queries: np.ndarray, k: int, query_block: int) -> tuple[np.ndarray, np.ndarray]:
        out_scores, out_indices = [], []
        for start in range(0, len(queries), query_block):
            q = torch.from_numpy(queries[start : start + query_block])
            best_s = torch.full((len(q), 0), -np.inf)
            best_i = torch.zeros((len(q), 0), dtype=torch.long)
            for offset, array in self.chunk_arrays():
                reference = torch.from_numpy(np.array(array))  # one chunk in memory
                s, i = top_k_inner_product(q, reference, k, chunk_size=query_block)
                best_s, best_i = merge_top_k(best_s, best_i, s, i + offset, k)
            out_scores.append(best_s.numpy())
            out_indices.append(best_i.numpy())
        return np.concatenate(out_scores), np.concatenate(out_indices)


def build_faiss_flat(arrays: Iterable[np.ndarray]):
    """faiss ``IndexFlatIP`` filled chunk by chunk."""
    import faiss

    index = None
    for array in arrays:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if index is None:
            index = faiss.IndexFlatIP(array.shape[1])
        index.add(array)
    return index


def vote(labels: list[str], scores: list[float]) -> tuple[str, int]:
    """Majority label among the neighbours; a tie goes to the label with the larger summed score.

    Returns (label, number of neighbours with it).
    """
    tally: dict[str, list[float]] = {}
    for label, score in zip(labels, scores, strict=True):
        entry = tally.setdefault(label, [0, 0.0])
        entry[0] += 1
        entry[1] += float(score)
    label = max(tally, key=lambda name: (tally[name][0], tally[name][1]))
    return label, int(tally[label][0])
