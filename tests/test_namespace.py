"""Installing medmetric adds exactly one top-level import name, ``medmetric``.

The repository keeps the design card's folders (lightning_modules/, datamodules/, callbacks/,
experiments/) at its top level; pyproject.toml maps them into the ``medmetric`` namespace. These
tests check the mapping from outside the repository (a subprocess whose working directory is
elsewhere, so the checkout's folders are not on the path), and in a built wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

GENERIC_NAMES = ("lightning_modules", "datamodules", "callbacks", "experiments", "bench", "tests", "run_io", "retrieval", "text")
MAPPED = {"lightning_modules": "lightning_modules", "datamodules": "datamodules", "callbacks": "callbacks",
          "experiments": "experiments", "medmetric": "medmetric"}


def run_elsewhere(code: str, cwd: Path, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path:
        env["PYTHONPATH"] = extra_path
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def generic_names_of_this_repo(cwd: Path, extra_path: str | None = None) -> dict[str, str]:
    """The generic top-level names that resolve to this repository's files, seen from ``cwd``."""
    code = (
        "import importlib.util, json\n"
        f"names = {GENERIC_NAMES!r}\n"
        "specs = {n: importlib.util.find_spec(n) for n in names}\n"
        "print(json.dumps({n: s.origin or str(list(s.submodule_search_locations or [])) for n, s in specs.items() if s}))\n"
    )
    result = run_elsewhere(code, cwd, extra_path)
    assert result.returncode == 0, result.stderr
    return {name: origin for name, origin in json.loads(result.stdout).items() if str(REPO) in origin}


def source_packages() -> set[str]:
    """Every folder with an ``__init__.py`` under the mapped folders, as its medmetric name."""
    names = set()
    for folder, prefix in [(REPO / "medmetric", "medmetric")] + [(REPO / f, f"medmetric.{f}") for f in MAPPED if f != "medmetric"]:
        for init in folder.rglob("__init__.py"):
            rest = init.parent.relative_to(folder).parts
            names.add(".".join((prefix, *rest)))
    return names


def test_no_generic_top_level_name_is_importable_from_outside_the_repo(tmp_path):
    ours = generic_names_of_this_repo(tmp_path)
    assert not ours, f"generic top-level names that import this repository's code: {ours}"


def test_every_package_imports_under_medmetric_from_outside_the_repo(tmp_path):
    packages = sorted(source_packages())
    code = "import importlib\n" + "".join(f"importlib.import_module({p!r})\n" for p in packages) + "print('ok')\n"
    result = run_elsewhere(code, tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_pyproject_lists_every_package_and_maps_only_into_medmetric():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(config["packages"]) == source_packages(), (
        "pyproject.toml [tool.setuptools] packages must list every package folder: "
        f"missing {sorted(source_packages() - set(config['packages']))}, extra {sorted(set(config['packages']) - source_packages())}"
    )
    assert all(name == "medmetric" or name.startswith("medmetric.") for name in config["packages"])
    assert all(name == "medmetric" or name.startswith("medmetric.") for name in config["package-dir"])


@pytest.mark.slow
def test_the_built_wheel_holds_one_top_level_name_and_the_configs(tmp_path):
    """A real (non-editable) build: what users get from ``pip install``. Built from a copy of the
    tracked files, so the build leaves no ``build/`` folder in the checkout and sees no stray file."""
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout, cannot list the tracked files: {listed.stderr.strip()}")
    source = tmp_path / "source"
    for name in listed.stdout.splitlines():
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("medmetric-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith((".dist-info", ".data"))}
    assert top == {"medmetric"}, top
    assert "medmetric/experiments/ham10000/stage1.yaml" in names
    assert "medmetric/lightning_modules/losses/pml.py" in names
    assert not [n for n in names if n.startswith(("medmetric/tests/", "medmetric/bench/"))]


def test_the_check_sees_a_generic_name(tmp_path):
    """Break it on purpose: with the repository root on the path (what the old top-level
    install did) the check reports the generic names."""
    ours = generic_names_of_this_repo(tmp_path, extra_path=str(REPO))
    assert {"lightning_modules", "datamodules", "callbacks", "experiments"} <= set(ours)
