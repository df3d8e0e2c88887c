"""Backbone factory: any timm name, in_chans, and local weights loaded safely."""

import pickle

import pytest
import timm
import torch

from medmetric.lightning_modules.backbones import create_backbone


def test_feature_dim_matches_the_pooled_output():
    model, dim = create_backbone("test_resnet", in_chans=1)
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, dim)


def test_local_weights_with_prefix_and_classifier_load_exactly(tmp_path):
    source = timm.create_model("test_resnet", num_classes=5)  # has an fc classifier
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    model, _ = create_backbone("test_resnet", pretrained_path=str(tmp_path / "w.pt"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.save(timm.create_model("resnet10t").state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt does not fit this backbone"):
        create_backbone("test_resnet", pretrained_path=str(tmp_path / "other.pt"))


class NotWeights:
    pass


def test_non_weight_files_are_refused_without_running_code(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pt is not a loadable weights file"):
        create_backbone("test_resnet", pretrained_path=str(tmp_path / "garbage.pt"))
    with open(tmp_path / "object.pt", "wb") as handle:  # a pickle of an arbitrary class
        pickle.dump({"state_dict": NotWeights()}, handle)
    with pytest.raises(ValueError, match=r"object\.pt is not a loadable weights file"):
        create_backbone("test_resnet", pretrained_path=str(tmp_path / "object.pt"))
    with pytest.raises(FileNotFoundError, match="model.pretrained_path"):
        create_backbone("test_resnet", pretrained_path=str(tmp_path / "absent.pt"))


def test_unknown_model_name_suggests_similar_ones():
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet18x'.*resnet18"):
        create_backbone("resnet18x")
