"""Smoke test of both stages on the real HAM10000 subset (../shared/data/ham10000).

A few steps only: it proves the real files, the real class list and the real lesion grouping
go through the whole pipeline; the demo measures accuracy.
"""

import json

import pandas as pd
import pytest

from medmetric.experiments.cli import main
from tests.conftest import require_real_ham10000

pytestmark = [pytest.mark.real_data, pytest.mark.slow]

SMALL = [
    "--data.image_size=32", "--data.batch_size=32", "--data.preload=false", "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2",
    "--wandb=disabled",
]


def test_two_stages_on_real_ham10000(tmp_path):
    data = require_real_ham10000()
    common = [f"--data.data_dir={data}", f"--runs_dir={tmp_path}", "--experiment=real", *SMALL]
    main(["fit", "--config", "experiments/ham10000/stage1.yaml", *common, "--model.backbone=test_resnet", "--data.m_per_class=8"])
    main(["fit", "--config", "experiments/ham10000/stage2.yaml", *common])
    split = pd.read_csv(tmp_path / "real" / "split.csv")
    metadata = pd.read_csv(data / "HAM10000_metadata.csv")
    assert sorted(split.image_id) == sorted(metadata.image_id)
    assert split.groupby("group").split.nunique().max() == 1  # no lesion in two splits
    manifest = json.loads((tmp_path / "real" / "handoff.json").read_text())
    assert sum(manifest["class_counts"]) == (split.split == "train").sum()
    (stage2,) = (tmp_path / "real" / "stage2").iterdir()
    results = json.loads((stage2 / "results.json").read_text())
    assert results["class_names"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert 0.0 <= results["metrics"]["accuracy"] <= 1.0
