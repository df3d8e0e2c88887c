"""CrossModalModule: scores from distances to every label's text prototype; GZSL training hygiene."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml

from medmetric.datamodules.chest_xray import DEFAULT_UNSEEN, ChestXray14DataModule
from medmetric.lightning_modules.cross_modal import CrossModalModule
from medmetric.text.label_embeddings import LocalTextEncoder, embed_texts, load_label_texts
from tests.test_text_embeddings import CXR14, LABELS_YAML, write_tiny_text_encoder


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    return write_tiny_text_encoder(tmp_path_factory.mktemp("encoder") / "tiny-bert")


def make_module(encoder, cache, class_names=CXR14, **kwargs):
    return CrossModalModule(class_names, backbone="test_resnet", text_encoder=str(encoder), text_cache_dir=str(cache), **kwargs)


def test_scores_are_minus_distance_to_every_text_prototype(tiny_encoder, tmp_path):
    torch.manual_seed(0)
    module = make_module(tiny_encoder, tmp_path / "cache").eval()
    images = torch.randn(4, 3, 32, 32)
    scores = module(images)
    # independent reference: the label texts embedded afresh (no cache), a plain double loop
    texts = load_label_texts(LABELS_YAML, CXR14, "name_description")
    prototypes = F.normalize(embed_texts(texts, LocalTextEncoder(str(tiny_encoder)), tmp_path / "other"), dim=1)
    with torch.no_grad():
        z = F.normalize(module.head(module.backbone(images)), dim=1)
    for i in range(4):
        for c in range(14):
            assert scores[i, c].item() == pytest.approx(-(z[i] - prototypes[c]).norm().item(), abs=1e-5)
    assert module.hparams.embedding_dim == 16


def test_a_label_with_only_a_text_description_gets_a_score(tiny_encoder, tmp_path):
    labels = yaml.safe_load(LABELS_YAML.read_text())
    labels["labels"].append({"name": "Tuberculosis", "description": "chronic mycobacterial infection with upper lobe cavities"})
    label_file = tmp_path / "labels.yaml"
    label_file.write_text(yaml.safe_dump(labels))
    module = make_module(tiny_encoder, tmp_path / "cache", class_names=[*CXR14, "Tuberculosis"], label_file=str(label_file))
    scores = module.eval()(torch.randn(2, 3, 32, 32))
    assert scores.shape == (2, 15) and torch.isfinite(scores).all()
    assert not torch.allclose(scores[:, 14], scores[:, 13])  # its own prototype, not a copy


def test_hparams_rebuild_the_same_module(tiny_encoder, tmp_path):
    """load_from_checkpoint calls __init__(**hparams): the stored embedding_dim must be accepted."""
    module = make_module(tiny_encoder, tmp_path / "cache", loss="dual_weighted_metric", head_hidden_dim=0)
    rebuilt = CrossModalModule(**module.hparams)
    torch.testing.assert_close(rebuilt.prototypes, module.prototypes)
    assert isinstance(rebuilt.head.net, torch.nn.Linear)


def test_bad_settings_fail_early_with_the_config_key(tiny_encoder, tmp_path):
    with pytest.raises(ValueError, match=r"model.loss.*weighted_focused_euclidean"):
        make_module(tiny_encoder, tmp_path, loss="focal_euclidean")
    with pytest.raises(ValueError, match=r"model.embedding_dim=384 but .* gives 16-d"):
        make_module(tiny_encoder, tmp_path, embedding_dim=384)
    with pytest.raises(FileNotFoundError, match="model.text_encoder"):
        CrossModalModule(CXR14, backbone="test_resnet", text_encoder=str(tmp_path / "no-biobert"))
    with pytest.raises(ValueError, match=r"no entry for labels \['Tuberculosis'\]"):
        make_module(tiny_encoder, tmp_path, class_names=[*CXR14, "Tuberculosis"])


class LossSpy(torch.nn.Module):
    """Wraps the module's loss and records what it is given."""

    def __init__(self, loss):
        super().__init__()
        self.loss, self.calls = loss, []

    def forward(self, embeddings, prototypes, targets):
        self.calls.append((prototypes.detach().clone(), targets.detach().clone()))
        return self.loss(embeddings, prototypes, targets)


@pytest.mark.slow  # a short Trainer.fit
@pytest.mark.parametrize("loss", ["weighted_focused_euclidean", "dual_weighted_metric"])
def test_gzsl_training_sees_no_unseen_positive_and_no_unseen_prototype(chestxray14_root, tiny_encoder, tmp_path, loss):
    data = ChestXray14DataModule(str(chestxray14_root), image_size=32, batch_size=16, unseen_labels=list(DEFAULT_UNSEEN),
                                 split_file=str(tmp_path / "split.csv"), num_workers=0, augment="none")
    module = make_module(tiny_encoder, tmp_path / "cache", loss=loss)
    module.loss_fn = spy = LossSpy(module.loss_fn)
    batches = []
    original_step = module.training_step

    def recording_step(batch, batch_idx):
        batches.append(batch[1].clone())
        return original_step(batch, batch_idx)

    module.training_step = recording_step
    L.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              num_sanity_val_steps=0, enable_model_summary=False).fit(module, datamodule=data)

    unseen = [CXR14.index(n) for n in DEFAULT_UNSEEN]
    seen = [c for c in range(14) if c not in unseen]
    assert module.unseen_labels == sorted(DEFAULT_UNSEEN, key=CXR14.index)
    assert spy.calls and len(spy.calls) == len(batches)
    for (prototypes, targets), batch_targets in zip(spy.calls, batches, strict=True):
        assert batch_targets[:, unseen].sum() == 0  # no unseen-label positive reaches training
        torch.testing.assert_close(prototypes, module.prototypes[seen])
        for u in unseen:  # no row is any unseen label's prototype
            assert (prototypes - module.prototypes[u]).norm(dim=1).min() > 1e-4
        torch.testing.assert_close(targets, batch_targets[:, seen])
    assert sum(t.sum() for _, t in spy.calls) > 0  # the loss did see seen positives
    # and the held-out images are only the unseen-only ones (train + val), never a test image
    assert data.held_out_unseen_only > 0
    scores = module.eval()(torch.randn(2, 3, 32, 32))
    assert scores.shape == (2, 14) and torch.isfinite(scores[:, unseen]).all()  # unseen labels scored at test
