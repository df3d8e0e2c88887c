"""Synthetic HAM10000 / ISIC 2019 writers: real on-disk formats, imbalance, determinism, signal."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

from medmetric.datamodules.synthetic import (
    HAM10000_CLASSES,
    ISIC2019_CLASSES,
    write_ham10000,
    write_isic2019,
)

HAM_CSV = "HAM10000_metadata.csv"
ISIC_GT = "ISIC_2019_Training_GroundTruth.csv"
ISIC_META = "ISIC_2019_Training_Metadata.csv"


@pytest.fixture(scope="module")
def ham(tmp_path_factory):
    root = write_ham10000(tmp_path_factory.mktemp("ham") / "nested", n_images=300)
    return root, pd.read_csv(root / HAM_CSV)


@pytest.fixture(scope="module")
def isic(tmp_path_factory):
    root = write_isic2019(tmp_path_factory.mktemp("isic"), n_images=300)
    gt = pd.read_csv(root / ISIC_GT)
    meta = pd.read_csv(root / ISIC_META, keep_default_na=False)
    return root, gt, meta


def _pixels(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _isic_labels(gt):
    return gt[list(ISIC2019_CLASSES)].to_numpy().argmax(1)


# ---------------------------------------------------------------- HAM10000


def test_ham_columns_and_ids(ham):
    root, df = ham
    assert list(df.columns) == [
        "lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"
    ]  # fmt: skip
    assert len(df) == 300 and df.image_id.is_unique
    assert df.lesion_id.str.fullmatch(r"HAM_\d{7}").all()
    assert df.image_id.str.fullmatch(r"ISIC_\d{7}").all()
    assert set(df.dx) == set(HAM10000_CLASSES)
    assert set(df.dx_type) <= {"histo", "follow_up", "consensus", "confocal"}
    assert set(df.sex) <= {"male", "female", "unknown"}
    assert df.age.isna().any() and df.age.dropna().between(0, 100).all()
    assert df.localization.notna().all()
    text = (root / HAM_CSV).read_text()
    assert text.startswith("lesion_id,image_id,dx,dx_type,age,sex,localization\n")
    raw_age = pd.read_csv(root / HAM_CSV, dtype=str, keep_default_na=False).age
    assert raw_age.str.fullmatch(r"(\d+\.0)?").all()  # "80.0" or empty, like the real file


def test_ham_images_exist_and_decode(ham):
    root, df = ham
    assert len(list((root / "images").glob("*.jpg"))) == len(df)
    for image_id in df.image_id:
        with Image.open(root / "images" / f"{image_id}.jpg") as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (80, 60)


def test_ham_lesions(ham):
    _, df = ham
    assert (df.groupby("lesion_id").dx.nunique() == 1).all()
    sizes = df.groupby("lesion_id").size()
    assert sizes.between(1, 3).all() and (sizes > 1).any()
    assert (df.groupby("dx").lesion_id.nunique() >= 6).all()


def test_ham_imbalance(tmp_path):
    df = pd.read_csv(write_ham10000(tmp_path, n_images=600) / HAM_CSV)
    counts = df.dx.value_counts()
    assert counts.index[0] == "nv"
    assert counts.max() / counts.min() >= 5
    assert (df.groupby("dx").lesion_id.nunique() >= 6).all()


def test_class_weights_override_and_minimum(tmp_path):
    weights = {"mel": 1.0, "nv": 1.0}
    df = pd.read_csv(write_ham10000(tmp_path, n_images=200, class_weights=weights) / HAM_CSV)
    counts = df.dx.value_counts()
    assert len(df) == 200 and set(counts.index[:2]) == {"mel", "nv"}
    assert (df.groupby("dx").lesion_id.nunique() >= 6).all()
    with pytest.raises(ValueError):
        write_ham10000(tmp_path / "bad", class_weights={"melanoma": 1.0})
    with pytest.raises(ValueError):
        write_ham10000(tmp_path / "small", n_images=20)


def test_other_image_size(tmp_path):
    root = write_ham10000(tmp_path, n_images=50, image_size=(64, 48))
    first = pd.read_csv(root / HAM_CSV).image_id[0]
    assert _pixels(root / "images" / f"{first}.jpg").shape == (48, 64, 3)


# ---------------------------------------------------------------- ISIC 2019


def test_isic_ground_truth(isic):
    root, gt, _ = isic
    assert list(gt.columns) == ["image", *ISIC2019_CLASSES, "UNK"]
    assert len(gt) == 300 and gt.image.is_unique
    assert gt.image.str.fullmatch(r"ISIC_\d{7}(_downsampled)?").all()
    assert gt.image.str.endswith("_downsampled").any()
    assert gt.image.is_monotonic_increasing
    onehot = gt[list(ISIC2019_CLASSES)].to_numpy()
    assert set(np.unique(onehot)) <= {0.0, 1.0}
    assert (onehot.sum(1) == 1.0).all()
    assert (gt.UNK == 0.0).all()
    assert (onehot.sum(0) > 0).all()
    header, first = (root / ISIC_GT).read_text().splitlines()[:2]
    assert header == "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK"
    assert set(first.split(",")[1:]) == {"0.0", "1.0"}


def test_isic_images(isic):
    root, gt, _ = isic
    for image in gt.image:
        with Image.open(root / "ISIC_2019_Training_Input" / f"{image}.jpg") as img:
            assert img.mode == "RGB" and img.size == (80, 60)


def test_isic_metadata_and_lesions(isic):
    _, gt, meta = isic
    assert list(meta.columns) == ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]
    assert meta.image.tolist() == gt.image.tolist()
    has_id = meta.lesion_id != ""
    assert (~has_id).any() and has_id.any()
    assert meta.lesion_id[has_id].str.fullmatch(r"BCN_\d{7}").all()
    labels = pd.Series(_isic_labels(gt))
    assert (labels[has_id].groupby(meta.lesion_id[has_id]).nunique() == 1).all()
    assert (meta.lesion_id[has_id].value_counts() > 1).any()
    groups = meta.lesion_id.where(has_id, meta.image)  # no lesion_id: the image is its own lesion
    assert (groups.groupby(labels).nunique() >= 6).all()
    assert labels.value_counts().index[0] == ISIC2019_CLASSES.index("NV")


def test_isic_without_metadata(tmp_path):
    root = write_isic2019(tmp_path, n_images=60, with_metadata=False)
    assert (root / ISIC_GT).exists() and not (root / ISIC_META).exists()


# ---------------------------------------------------------------- shared behaviour


@pytest.mark.parametrize(
    "write, csv_name, folder",
    [(write_ham10000, HAM_CSV, "images"), (write_isic2019, ISIC_GT, "ISIC_2019_Training_Input")],
)
def test_determinism(tmp_path, write, csv_name, folder):
    a, b, c = (write(tmp_path / name, n_images=60, seed=seed) for name, seed in
               [("a", 3), ("b", 3), ("c", 4)])  # fmt: skip
    assert (a / csv_name).read_text() == (b / csv_name).read_text()
    assert (a / csv_name).read_text() != (c / csv_name).read_text()
    names = sorted(p.name for p in (a / folder).iterdir())
    assert names == sorted(p.name for p in (b / folder).iterdir())
    for name in names:
        assert np.array_equal(_pixels(a / folder / name), _pixels(b / folder / name))
    c_names = sorted(p.name for p in (c / folder).iterdir())
    assert names != c_names or any(
        not np.array_equal(_pixels(a / folder / n), _pixels(c / folder / n)) for n in names
    )


@pytest.mark.parametrize("write, csv_name", [(write_ham10000, HAM_CSV), (write_isic2019, ISIC_GT)])
def test_refuses_to_overwrite(tmp_path, write, csv_name):
    (tmp_path / csv_name).write_text("precious user data\n")
    with pytest.raises(FileExistsError, match=csv_name):
        write(tmp_path, n_images=60)
    assert (tmp_path / csv_name).read_text() == "precious user data\n"


def _features(paths):
    """Mean RGB, per-channel std, centre-crop mean RGB and mean chroma of each image."""
    rows = []
    for path in paths:
        x = _pixels(path).astype(np.float32) / 255.0
        h, w, _ = x.shape
        centre = x[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]
        chroma = x.max(-1) - x.min(-1)
        rows.append(np.r_[x.mean((0, 1)), x.std((0, 1)), centre.mean((0, 1)), chroma.mean()])
    return np.array(rows)


def _nearest_mean_balanced_accuracy(features, labels, groups):
    """Fit class means on half of the lesions of each class, score on the other half."""
    fit = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        lesions = sorted(set(groups[labels == cls]))
        fit |= np.isin(groups, lesions[::2]) & (labels == cls)
    mu, sd = features[fit].mean(0), features[fit].std(0) + 1e-6
    z = (features - mu) / sd
    classes = np.unique(labels[fit])
    means = np.stack([z[fit & (labels == c)].mean(0) for c in classes])
    pred = classes[((z[~fit, None, :] - means[None]) ** 2).sum(-1).argmin(1)]
    return balanced_accuracy_score(labels[~fit], pred)


def test_learnable_signal_ham(ham):
    root, df = ham
    features = _features(root / "images" / f"{i}.jpg" for i in df.image_id)
    labels = df.dx.map(HAM10000_CLASSES.index).to_numpy()
    assert _nearest_mean_balanced_accuracy(features, labels, df.lesion_id.to_numpy()) > 0.6


def test_learnable_signal_isic(isic):
    root, gt, meta = isic
    features = _features(root / "ISIC_2019_Training_Input" / f"{i}.jpg" for i in gt.image)
    groups = meta.lesion_id.where(meta.lesion_id != "", meta.image).to_numpy()
    assert _nearest_mean_balanced_accuracy(features, _isic_labels(gt), groups) > 0.6
