"""Play the W&B sweep agent on every sweep file, offline.

For each ``experiments/sweeps/*.yaml``: sample one parameter set from its ``parameters`` (the
distributions the files use), expand ``command`` with wandb's own ``create_sweep_command`` /
``create_sweep_command_args`` and the agent's macro loop (copied from
``wandb.wandb_agent.Agent._command_run``; a guard checks the installed agent still has it), run
the result for a few steps on synthetic data, and check in the run's ``config.yaml`` (what
LightningCLI instantiated) and ``hparams.yaml`` (what the model saved) that every swept value
arrived.
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from wandb.sdk.launch.sweeps import utils as sweep_utils

from tests.conftest import REPO

pytestmark = pytest.mark.slow
SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
TINY = [  # appended after ${args}: sizes only, never a swept key (checked below)
    "--model.backbone=test_resnet", "--data.image_size=32", "--data.batch_size=32", "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
    "--data.preload=false", "--data.num_workers=0", "--wandb=disabled",
]


def sample(spec: dict, rng: np.random.Generator):
    """One value from a W&B parameter spec (the distributions our sweep files use)."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return spec["values"][rng.integers(len(spec["values"]))]
    kind = spec.get("distribution")
    if kind == "log_uniform_values":
        return float(math.exp(rng.uniform(math.log(spec["min"]), math.log(spec["max"]))))
    if kind == "uniform":
        return float(rng.uniform(spec["min"], spec["max"]))
    if kind == "int_uniform":
        return int(rng.integers(spec["min"], spec["max"] + 1))
    raise NotImplementedError(f"teach the agent test the distribution {kind!r}")


def agent_command(sweep: dict, params: dict) -> list[str]:
    """The command list wandb's agent builds for one run (wandb/wandb_agent.py, _command_run)."""
    command = {"args": {k: {"value": v} for k, v in params.items()}, "program": sweep["program"]}
    sweep_command = sweep_utils.create_sweep_command(list(sweep["command"]))
    sweep_vars = sweep_utils.create_sweep_command_args(command)
    sweep_vars["interpreter"] = ["python"]
    sweep_vars["program"] = [command["program"]]
    sweep_vars["env"] = ["/usr/bin/env"]
    command_list = []
    for c in sweep_command:
        c = str(c)
        if c.startswith("${") and c.endswith("}"):
            replace_list = sweep_vars.get(c[2:-1])
            command_list += replace_list or []
        else:
            command_list += [c]
    return command_list


def test_installed_agent_expands_commands_as_copied():
    import wandb.wandb_agent

    source = inspect.getsource(wandb.wandb_agent.Agent._command_run)
    for line in ('sweep_vars["interpreter"] = ["python"]', 'sweep_vars["program"] = [command["program"]]',
                 'sweep_vars["env"] = ["/usr/bin/env"]', 'replace_list = sweep_vars.get(c[2:-1])',
                 "sweep_utils.create_sweep_command(self._sweep_command)",
                 "sweep_utils.create_sweep_command_args(command)"):
        assert line in source, f"wandb's agent changed ({line!r} missing): update agent_command()"


def test_every_sweep_file_is_well_formed():
    assert {p.name for p in SWEEPS} >= {"stage1_ham10000.yaml", "stage2_ham10000.yaml"}
    for path in SWEEPS:
        sweep = yaml.safe_load(path.read_text())
        assert sweep["metric"] == {"name": "val/balanced_accuracy", "goal": "maximize"}, path
        assert "${args}" in sweep["command"] and "${program}" in sweep["command"], path
        assert all(k.split(".")[0] in ("model", "data", "trainer") for k in sweep["parameters"]), path
        swept = {f"--{k}" for k in sweep["parameters"]}
        assert not swept & {flag.split("=")[0] for flag in TINY}, "the test must not override swept values"
        if "stage2" in path.name:  # one fixed stage-1 backbone for the whole sweep
            assert any(str(c).startswith("--model.handoff=") for c in sweep["command"]), path
            assert "model.handoff" not in sweep["parameters"], path


def untrained_stage1_manifest(ham_root: Path, folder: Path) -> Path:
    """A stage-1 manifest of an untrained model on the default split (the split stage 2 makes)."""
    from medmetric.callbacks.handoff import stage1_manifest
    from medmetric.datamodules.skin import HAM10000DataModule
    from medmetric.lightning_modules.metric_pretrain import MetricPretrainModule
    from medmetric.run_io.manifest import write_manifest

    data = HAM10000DataModule(str(ham_root), image_size=32)
    data.setup("fit")
    stage1 = MetricPretrainModule(data.class_names, backbone="test_resnet", embedding_dim=16)
    manifest = stage1_manifest(folder, stage1, stage1.state_dict(), data.class_counts, data.split_sha256())
    write_manifest(folder / "handoff.json", manifest)
    return folder / "handoff.json"


def saved_value(config: dict, key: str):
    group, name = key.split(".", 1)
    section = config[group]
    return section.get("init_args", section)[name]


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=lambda p: p.stem)
def test_agent_run_receives_every_swept_value(sweep_file, ham_root, tmp_path):
    sweep = yaml.safe_load(sweep_file.read_text())
    params = {k: sample(spec, np.random.default_rng(len(sweep_file.name))) for k, spec in sweep["parameters"].items()}
    command = agent_command(sweep, params)
    assert command[:3] == ["/usr/bin/env", "python", "experiments/__main__.py"]
    assert [c for c in command if c.startswith(tuple(f"--{k}=" for k in params))] == [f"--{k}={v}" for k, v in params.items()]
    command[1] = sys.executable  # the agent's `python` is the environment's interpreter (PATH)
    runs = tmp_path / "runs"
    extra = [f"--data.data_dir={ham_root}", f"--runs_dir={runs}", *TINY]
    if "stage2" in sweep_file.name:
        extra.append(f"--model.handoff={untrained_stage1_manifest(ham_root, tmp_path)}")
    result = subprocess.run(command + extra, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    (run,) = [p for p in runs.glob("*/stage*/*") if (p / "config.yaml").is_file()]
    config = yaml.safe_load((run / "config.yaml").read_text())
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    for key, value in params.items():
        got = saved_value(config, key)
        assert got == pytest.approx(value, rel=1e-12) if isinstance(value, float) else got == value, (key, got, value)
        if key.startswith("model."):  # and the LightningModule itself was built with it
            assert hparams[key.split(".", 1)[1]] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), key
