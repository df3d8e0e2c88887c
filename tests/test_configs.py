"""Every shipped config parses through the real CLI (class paths resolve, keys exist).

``make train-stage1 DATA=isic2019`` once named ``ISIC 2019DataModule`` (a space in the class
path) and no test noticed; ``--print_config`` parses and validates without building anything.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import yaml

from medmetric.experiments.cli import main
from tests.conftest import REPO

CONFIGS = sorted(
    path for path in (REPO / "experiments").glob("*/*.yaml")
    if path.parent.name not in ("sweeps", "trainer") and "model" in (yaml.safe_load(path.read_text()) or {})
)


def test_configs_are_found():
    assert len(CONFIGS) >= 10, CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses(config):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None), out.getvalue()[-2000:]
    printed = yaml.safe_load(out.getvalue())
    declared = yaml.safe_load(config.read_text())
    assert printed["model"]["class_path"] == declared["model"]["class_path"]
    assert printed["data"]["class_path"] == declared["data"]["class_path"]
