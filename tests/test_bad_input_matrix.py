"""The bad-input matrix of issue 8: one test per row, each checking the error (what, where, fix)
or the documented, logged recovery, and that nothing is left looking like a finished result.

Rows also tested elsewhere (tests/test_datamodules.py, test_samplers.py, test_handoff.py) are
repeated here, parametrized, so the matrix is complete in one readable place. With
``MEDMETRIC_MATRIX_OUT=<file>`` every row appends ``row<TAB>message`` to that file (the table
of messages in the issue note is made from it).
"""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from medmetric.callbacks.atomic_checkpoint import AtomicCheckpointIO
from medmetric.callbacks.finite_loss import FiniteLossGuard, NonFiniteLossError
from medmetric.datamodules import images as images_module
from medmetric.datamodules.base import ImageDataset
from medmetric.datamodules.images import ImageReadError, load_rgb
from medmetric.datamodules.skin import HAM10000DataModule, ISIC2019DataModule
from medmetric.datamodules.splits import write_split_csv
from medmetric.datamodules.transforms import build_transform
from medmetric.lightning_modules.backbones import create_backbone, load_backbone_weights
from medmetric.lightning_modules.metric_pretrain import MetricPretrainModule
from medmetric.lightning_modules.rebalanced_head import RebalancedHeadModule
from medmetric.run_io.atomic import AtomicWriteError
from medmetric.run_io.manifest import HandoffError, check_manifest, read_manifest, write_manifest
from tests.conftest import make_stage1_handoff

HAM_META = "HAM10000_metadata.csv"
ISIC_GT = "ISIC_2019_Training_GroundTruth.csv"
FAST = {"image_size": 32, "num_workers": 0, "batch_size": 16}
HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def record(row: str, message: str) -> str:
    """Append the row's message to $MEDMETRIC_MATRIX_OUT (for the issue note); return it."""
    out = os.environ.get("MEDMETRIC_MATRIX_OUT")
    if out:
        with open(out, "a") as handle:
            handle.write(f"{row}\t{' '.join(str(message).split())}\n")
    return message


def ham(root, **kwargs) -> HAM10000DataModule:
    return HAM10000DataModule(str(root), **{**FAST, **kwargs})


def meta(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / HAM_META, dtype=str, keep_default_na=False)


def edit_csv(path: Path, edit) -> None:
    edit(pd.read_csv(path, dtype=str, keep_default_na=False)).to_csv(path, index=False)


@pytest.fixture
def fresh_recoveries(monkeypatch):
    """Recoveries are logged once per process: start each test with none reported yet."""
    monkeypatch.setattr(images_module, "_reported", set())


# ============================================================================ image files


def test_missing_file(ham_copy, tmp_path):
    image_id = meta(ham_copy)["image_id"].iloc[7]
    (ham_copy / "images" / f"{image_id}.jpg").unlink()
    split_file = tmp_path / "split.csv"
    with pytest.raises(FileNotFoundError) as err:
        ham(ham_copy, split_file=str(split_file)).prepare_data()
    message = record("missing file", err.value)
    assert re.search(r"1 of 300 images", str(message)) and image_id in str(message)
    assert "Put the image files in place or remove their rows" in str(message)
    assert not split_file.exists()  # refused before anything was written


@pytest.mark.parametrize("row", ["zero-byte file", "truncated JPEG"])
def test_unreadable_file_names_it(ham_copy, row):
    dm = ham(ham_copy)
    dm.setup()
    dataset = dm.datasets["train"]
    bad = Path(dataset.paths[3])
    if row == "zero-byte file":
        bad.write_bytes(b"")
    else:
        full = bad.read_bytes()
        bad.write_bytes(full[: len(full) // 2])  # header and half the scan survive
    dataset[2]  # neighbours still load
    with pytest.raises(ImageReadError) as err:
        dataset[3]
    message = record(row, err.value)
    assert str(bad) in str(message) and "replace it, or remove its row" in str(message)


def test_png_with_alpha_drops_alpha_and_logs(tmp_path, caplog, fresh_recoveries):
    rgba = np.zeros((6, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 200, np.arange(5, dtype=np.uint8) * 40, 17
    rgba[..., 3] = np.arange(6, dtype=np.uint8)[:, None] * 50  # varying transparency
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    with caplog.at_level(logging.WARNING, logger="medmetric.datamodules.images"):
        out = load_rgb(path)
    assert out.shape == (6, 5, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgba[..., :3])  # colour as stored, alpha gone
    record("PNG with alpha", caplog.messages[0])
    assert "alpha channel (RGBA): alpha dropped" in caplog.messages[0] and str(path) in caplog.messages[0]


def test_16_bit_png_is_scaled_not_clipped(tmp_path, caplog, fresh_recoveries):
    values = np.array([[0, 257, 1000, 32768], [40000, 65000, 65534, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # really stored as 16-bit
    with caplog.at_level(logging.WARNING, logger="medmetric.datamodules.images"):
        out = load_rgb(path)
    expected = np.array([[round(v * 255 / 65535) for v in row] for row in values.tolist()], dtype=np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], expected)
    assert out.max() == 255 and len(np.unique(out)) == 7  # 40000 and 65000 are not both clipped to 255
    record("16-bit PNG", caplog.messages[0])
    assert "16-bit" in caplog.messages[0] and "255/65535" in caplog.messages[0]


def test_grayscale_image_in_rgb_set_is_replicated(ham_copy, caplog, fresh_recoveries):
    dm = ham(ham_copy, augment="none")
    dm.setup()
    dataset = dm.datasets["val"]
    path = Path(dataset.paths[0])
    gray = np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) % 251
    Image.fromarray(gray.astype(np.uint8), "L").save(path, format="JPEG", quality=100)
    with caplog.at_level(logging.WARNING, logger="medmetric.datamodules.images"):
        image = load_rgb(path)
        tensor, _ = dataset[0]
    assert image.shape == (32, 32, 3)
    np.testing.assert_array_equal(image[..., 0], image[..., 1])
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    assert tensor.shape == (3, 32, 32)
    record("grayscale image in an RGB set", caplog.messages[0])
    assert "grayscale (L): channel replicated to RGB" in caplog.messages[0]


def test_image_smaller_than_crop_is_upscaled_with_a_warning(tmp_path, caplog, fresh_recoveries):
    path = tmp_path / "tiny.png"
    Image.fromarray(np.full((10, 12, 3), 90, np.uint8)).save(path)
    dataset = ImageDataset([str(path)], [0], build_transform("dermoscopy", 32), image_size=32)
    with caplog.at_level(logging.WARNING, logger="medmetric.datamodules.base"):
        tensor, _ = dataset[0]
    assert tensor.shape == (3, 32, 32)  # decision: upscale (the random resized crop / resize does it)
    record("image smaller than the crop", caplog.messages[0])
    assert "12x10, smaller than data.image_size=32: upscaled" in caplog.messages[0]


# ============================================================================ CSV / index


def _drop_dx(m):
    return m.rename(columns={"dx": "diagnosis"})


def _duplicate_id(m):
    m.loc[20, "image_id"] = m.loc[10, "image_id"]
    return m


def _unknown_label(m):
    m.loc[12, "dx"] = "melanoma"
    return m


def _nan_label(m):
    m.loc[9, "dx"] = ""
    return m


@pytest.mark.parametrize(
    "row, edit, expected",
    [
        ("CSV with missing/renamed columns", _drop_dx, r"missing column\(s\) \['dx'\]; found \[.*'diagnosis'.*Rename the columns"),
        ("CSV with duplicate ids", _duplicate_id, r"row 22: duplicate image_id .* each image must be listed once"),
        ("CSV label outside the class list", _unknown_label, r"row 14, column 'dx': unknown class 'melanoma' .* valid classes: \['akiec'"),
        ("CSV with NaN labels", _nan_label, r"row 11, column 'dx': empty value; fill it or drop the row"),
    ],
)
def test_bad_ham_csv(ham_copy, row, edit, expected):
    edit_csv(ham_copy / HAM_META, edit)
    with pytest.raises(ValueError) as err:
        ham(ham_copy).setup()
    message = record(row, err.value)
    assert str(ham_copy / HAM_META) in str(message)
    assert re.search(expected, str(message)), message


@pytest.mark.parametrize("row, value", [("CSV with NaN labels (one-hot)", "NaN"), ("multi-hot row in a single-label set", "1.0")])
def test_bad_isic_one_hot_row(isic_copy, row, value):
    path = isic_copy / ISIC_GT
    truth = pd.read_csv(path, dtype=str, keep_default_na=False)
    column = "BCC" if truth.loc[5, "BCC"] in ("0", "0.0") else "MEL"
    truth.loc[5, column] = value
    truth.to_csv(path, index=False)
    with pytest.raises(ValueError) as err:
        ISIC2019DataModule(str(isic_copy), **FAST).setup()
    message = record(row, err.value)
    assert f"row 7 (image {truth.loc[5, 'image']!r})" in str(message) and "exactly one 1" in str(message)


# ============================================================================ splits


def test_class_absent_from_train(ham_copy, tmp_path):
    dm = ham(ham_copy)
    dm.setup()
    table = dm.table.copy()
    df = table["label"] == "df"
    table.loc[df, "split"] = np.where(np.arange(df.sum()) % 2 == 0, "val", "test")  # whole lesions per class
    table.loc[df, "split"] = table.loc[df].groupby("group")["split"].transform("first")
    split_file = tmp_path / "split.csv"
    write_split_csv(split_file, table)
    before = split_file.read_bytes()
    with pytest.raises(ValueError) as err:
        ham(ham_copy, split_file=str(split_file)).setup()
    message = record("a class absent from train", err.value)
    assert "'df' in train" in str(message) and "delete the split file first" in str(message)
    assert split_file.read_bytes() == before  # the user's split file is never rewritten


def test_empty_split(ham_root):
    with pytest.raises(ValueError) as err:
        ham(ham_root, val_fraction=0.0).setup()
    message = record("an empty split", err.value)
    assert re.search(r"split 'val' of .* is empty \(\{'train': \d+, 'val': 0, 'test': \d+\}\)", str(message))
    assert "data.val_fraction" in str(message)


# ============================================================================ names and options


def _build(kind: str, tmp_path: Path):
    if kind == "sampler":
        return HAM10000DataModule("unused", sampler="m_per_klass")
    if kind == "metric loss":
        return MetricPretrainModule(HAM_CLASSES, backbone="test_resnet", metric_loss="triplett")
    if kind == "head loss":
        return MetricPretrainModule(HAM_CLASSES, backbone="test_resnet", head_loss="focall")
    handoff = make_stage1_handoff(tmp_path, HAM_CLASSES)
    return RebalancedHeadModule(HAM_CLASSES, handoff=str(handoff), strategy="tau-norm")


@pytest.mark.parametrize("kind, key, valid", [
    ("sampler", "data.sampler", "'m_per_class'"),
    ("metric loss", "model.metric_loss", "supcon"),
    ("head loss", "model.head_loss", "balanced_softmax"),
    ("strategy", "model.strategy", "'tau_norm'"),
])
def test_unknown_name_lists_the_valid_ones(tmp_path, kind, key, valid):
    with pytest.raises(ValueError) as err:
        _build(kind, tmp_path)
    message = record(f"unknown {kind} name", err.value)
    assert "unknown" in str(message) and valid in str(message)
    assert key in str(message) or kind == "metric loss"


@pytest.mark.parametrize("row, batch_size, m, expected", [
    ("m-per-class batch size not divisible by M", 10, 4, r"batch_size=10 is not divisible by m_per_class=4; use a multiple of 4 such as 8 or 12"),
    ("more classes per batch than the data has", 64, 4, r"holds 16 classes per batch, but only 7 classes have samples; reduce batch_size to <= 28"),
])
def test_contradictory_sampler_options(ham_root, row, batch_size, m, expected):
    dm = ham(ham_root, sampler="m_per_class", batch_size=batch_size, m_per_class=m)
    dm.setup()
    with pytest.raises(ValueError) as err:
        dm.train_dataloader()  # built before the first training step
    assert re.search(expected, str(record(row, err.value)))


# ============================================================================ checkpoints


@pytest.mark.parametrize("row", ["checkpoint from another class list", "checkpoint from another backbone", "weights of another architecture"])
def test_checkpoint_from_another_model(tmp_path, row):
    if row == "weights of another architecture":
        other, _ = create_backbone("resnet10t")
        torch.save(other.state_dict(), tmp_path / "resnet10t.pt")
        model, _ = create_backbone("test_resnet")
        with pytest.raises(ValueError) as err:
            load_backbone_weights(model, tmp_path / "resnet10t.pt")
        assert "does not fit this backbone" in str(record(row, err.value))
        return
    manifest = read_manifest(make_stage1_handoff(tmp_path, HAM_CLASSES))
    with pytest.raises(HandoffError) as err:
        if row == "checkpoint from another class list":
            check_manifest(manifest, class_names=HAM_CLASSES[:-1] + ["other"])
        else:
            check_manifest(manifest, backbone="resnet10t")
    message = str(record(row, err.value))
    assert str(tmp_path / "handoff.json") in message
    assert ("re-run stage 1" in message) and ("classes" in message if "class" in row else "model.backbone" in message)


@pytest.mark.parametrize("kind", ["text file", "truncated checkpoint"])
def test_file_that_is_not_a_checkpoint(tmp_path, kind):
    path = tmp_path / "model.ckpt"
    if kind == "text file":
        path.write_text("epoch: 3\nthis is a YAML note, not a checkpoint\n")
    else:
        torch.save({"state_dict": {"w": torch.ones(100)}}, path)
        path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError) as err:
        AtomicCheckpointIO().load_checkpoint(path)
    message = str(record(f"a file that is not a checkpoint ({kind})", err.value))
    assert str(path) in message and "not a PyTorch checkpoint" in message
    model, _ = create_backbone("test_resnet")
    with pytest.raises(ValueError, match="not a loadable weights file"):
        load_backbone_weights(model, path)  # model.pretrained_path says the same


@pytest.mark.parametrize("key, other", [("class_names", HAM_CLASSES[:-1] + ["other"]), ("backbone", "resnet10t")])
def test_lightning_checkpoint_of_another_model_is_refused_before_loading(ham_root, tmp_path, key, other):
    saved_kwargs = {"class_names": HAM_CLASSES, "backbone": "test_resnet", "embedding_dim": 16, key: other}
    saver = L.Trainer(logger=False, max_epochs=0, enable_progress_bar=False, plugins=[AtomicCheckpointIO()])
    saver.strategy.connect(MetricPretrainModule(**saved_kwargs))
    saver.save_checkpoint(tmp_path / "other.ckpt")
    model = MetricPretrainModule(HAM_CLASSES, backbone="test_resnet", embedding_dim=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(logger=False, enable_progress_bar=False, plugins=[AtomicCheckpointIO()], limit_test_batches=1,
                        default_root_dir=tmp_path)
    with pytest.raises(ValueError) as err:
        trainer.test(model, datamodule=ham(ham_root), ckpt_path=tmp_path / "other.ckpt")  # --ckpt_path
    message = str(record(f"Lightning checkpoint (--ckpt_path) of another {key}", err.value))
    assert f"checkpoint {tmp_path / 'other.ckpt'} was saved from a MetricPretrainModule with {key}={other!r}" in message
    assert f"model.{key}" in message and "leave out --ckpt_path" in message
    for name, value in model.state_dict().items():  # nothing was loaded
        torch.testing.assert_close(value, before[name])


# ============================================================================ training faults


class TinyClassifier(L.LightningModule):
    """Mean colour -> linear layer; the loss turns NaN at ``bad_step``; records each step's targets."""

    def __init__(self, bad_step: int):
        super().__init__()
        self.layer = nn.Linear(3, len(HAM_CLASSES))
        self.bad_step = bad_step
        self.targets_at_step: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        images, targets = batch
        self.targets_at_step[self.global_step] = targets.tolist()
        loss = F.cross_entropy(self.layer(images.mean(dim=(2, 3))), targets)
        return loss * float("nan") if self.global_step == self.bad_step else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_non_finite_loss_stops_naming_step_batch_and_images_and_keeps_last_good_checkpoint(ham_root, tmp_path):
    dm = ham(ham_root, batch_size=8, augment="none")
    model = TinyClassifier(bad_step=4)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=1)
    trainer = L.Trainer(
        max_epochs=3, limit_train_batches=3, limit_val_batches=0, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, use_distributed_sampler=False,
        callbacks=[FiniteLossGuard(), checkpoints], plugins=[AtomicCheckpointIO()],
    )
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit(model, datamodule=dm)
    message = str(record("non-finite loss", err.value))
    assert "training loss is nan (rank 0) at epoch 1, global step 4, batch 1" in message
    ids = re.search(r"images \[(.*?)\]", message).group(1).replace("'", "").split(", ")
    labels = meta(ham_root).set_index("image_id").loc[ids, "dx"].map(HAM_CLASSES.index).tolist()
    assert labels == model.targets_at_step[4]  # the ids named are the images of the bad batch
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4
    for name, value in model.state_dict().items():  # the NaN step never reached the weights
        assert torch.isfinite(value).all()
        torch.testing.assert_close(last["state_dict"][name], value)


def _checkpoint(value: float) -> dict:
    return {"state_dict": {"w": torch.full((64, 64), value)}, "epoch": int(value)}


@pytest.mark.parametrize("target", ["checkpoint", "manifest"])
def test_disk_full_while_writing_keeps_the_old_file(tmp_path, monkeypatch, target):
    if target == "checkpoint":
        path = tmp_path / "checkpoints" / "last.ckpt"
        AtomicCheckpointIO().save_checkpoint(_checkpoint(1.0), path)
        real_save = torch.save

        def save_until_disk_full(obj, handle, *args, **kwargs):  # a partial file, then ENOSPC
            real_save(obj, handle, *args, **kwargs)
            handle.truncate(1000)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(torch, "save", save_until_disk_full)
        with pytest.raises(AtomicWriteError) as err:
            AtomicCheckpointIO().save_checkpoint(_checkpoint(2.0), path)
        monkeypatch.undo()
        assert torch.load(path, weights_only=True)["state_dict"]["w"][0, 0].item() == 1.0
    else:
        handoff = make_stage1_handoff(tmp_path, HAM_CLASSES)
        path = tmp_path / "handoff.json"
        manifest = read_manifest(handoff)
        before = path.read_bytes()

        def fsync_disk_full(fd):  # delayed allocation: a full disk often shows at fsync
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", fsync_disk_full)
        with pytest.raises(AtomicWriteError) as err:
            write_manifest(path, {**manifest, "class_counts": [1] * len(HAM_CLASSES)})
        monkeypatch.undo()
        assert path.read_bytes() == before
        assert read_manifest(path)["class_counts"] == manifest["class_counts"]
    message = str(record(f"disk full while writing the {target}", err.value))
    assert "could not write" in message and str(path) in message
    assert "the disk is full; the previous version is intact and no partial file was left" in message
    assert sorted(p.name for p in path.parent.iterdir() if ".tmp" in p.name) == []  # no partial file
