"""The one entry point: ``python -m medmetric.experiments fit --config experiments/<data>/stage1.yaml``.

LightningCLI reads YAML configs and flags (``--model.lr=0.01``) into typed ``__init__``
arguments, so configs, the command line and W&B sweep agents (``${args}``) all reach the same
place. On top of LightningCLI this adds the experiment layout:

    runs/<experiment>/split.csv               the grouped split, shared by all its runs
    runs/<experiment>/handoff.json            latest stage-1 manifest (stage 2 reads it)
    runs/<experiment>/<stage>/<timestamp>/    one run: config.yaml, checkpoints/, metrics.csv,
                                              wandb/, results.json (and handoff.json, backbone.pt)

plus the default callbacks (best checkpoint on validation balanced accuracy, handoff, results)
and loggers (CSV, and W&B, offline when no API key is set).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from lightning.pytorch.cli import LightningCLI  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from medmetric.callbacks.atomic_checkpoint import AtomicCheckpointIO  # noqa: E402
from medmetric.callbacks.feature_cache import FeatureCache  # noqa: E402
from medmetric.callbacks.finite_loss import FiniteLossGuard  # noqa: E402
from medmetric.callbacks.handoff import StageHandoff  # noqa: E402
from medmetric.callbacks.preemption import (  # noqa: E402
    LastEveryEpochCheckpoint,
    RNGStateInCheckpoint,
    SaveOnPreemption,
)
from medmetric.callbacks.results import ResultsWriter  # noqa: E402
from medmetric.callbacks.selection_guard import ValidationOnlySelection  # noqa: E402
from medmetric.datamodules.contracts import RankShardedData, require  # noqa: E402
from medmetric.experiments.safe_config import ALLOW_ENV, check_class_paths, prescan_args  # noqa: E402
from medmetric.experiments.wandb_mode import WANDB_MODES, wandb_offline  # noqa: E402
from medmetric.lightning_modules.contracts import declared_monitor, declared_stage  # noqa: E402
from medmetric.run_io.atomic import atomic_write  # noqa: E402
from medmetric.run_io.manifest import read_manifest  # noqa: E402
from medmetric.run_io.resume import (  # noqa: E402
    ResumePlan,
    named_or_new_run_dir,
    resume_plan_for_process,
    write_resume_record,
)
from medmetric.run_io.run_folders import RUN_DIR_ENV, RunPaths  # noqa: E402

# Lightning warnings that are expected in this layout: the run folder already holds config and
# W&B files when the CSV logger starts (it removes only an old metrics.csv, which a fresh run
# folder never has), and stage 2 keeps its frozen backbone in eval mode on purpose.
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


class MedMetricCLI(LightningCLI):
    """LightningCLI with the medmetric run layout, default callbacks and loggers."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": False})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--experiment", default="default", help="experiment name: runs/<experiment>/ holds its split, handoff and runs")
        parser.add_argument("--runs_dir", default="runs", help="root folder of all experiments")
        parser.add_argument("--test_after_fit", type=bool, default=True, help="after fit, test the best checkpoint and write results.json")
        parser.add_argument("--wandb", default="auto", help=f"W&B logging: {', '.join(WANDB_MODES)} (auto: offline without an API key)")
        parser.add_argument("--wandb_project", default="medmetric")
        parser.add_argument("--allow_class_paths", default="", help=f"extra packages configs may name classes from, comma-separated (or {ALLOW_ENV})")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")

    # --- layout ------------------------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        check_class_paths(config, config.get("allow_class_paths"))  # before any folder or object is made
        # the stage is declared on the model class (lightning_modules/contracts.py), read before
        # instantiation: it decides the run folder and whether the stage-1 handoff is read
        model_class = resolve_class(config.model.class_path)
        stage = declared_stage(model_class, config.model.class_path)
        declared_monitor(model_class, config.model.class_path)  # refused before any folder is made
        experiment_dir = Path(config.runs_dir) / config.experiment
        inherited = os.environ.get(RUN_DIR_ENV) if os.environ.get("LOCAL_RANK", "0") != "0" else None
        self.resume = ResumePlan(None, None)  # fit --ckpt_path: continue a run (experiments/resume.py)
        if self.subcommand == "fit":
            self.resume = resume_plan_for_process(config.get("ckpt_path"), experiment_dir / stage, inherited is not None)
            config.ckpt_path = str(self.resume.checkpoint) if self.resume.checkpoint else None
        run_dir = Path(inherited) if inherited else self.resume.run_dir or named_or_new_run_dir(experiment_dir / stage)
        os.environ[RUN_DIR_ENV] = str(run_dir)
        _CURRENT_RUN["dir"] = run_dir
        self.paths = RunPaths(config.experiment, stage, experiment_dir, run_dir)
        if config.trainer.default_root_dir is None:
            config.trainer.default_root_dir = str(run_dir)
        if "split_file" in config.data.init_args and config.data.init_args.split_file is None:
            config.data.init_args.split_file = str(self.paths.split_file)
        if stage == "stage2":
            if config.model.init_args.get("handoff") is None:
                config.model.init_args.handoff = str(self.paths.handoff)
            # fail here, with the command to run first, rather than inside jsonargparse's
            # instantiation, which buries the message in a type-validation report
            read_manifest(config.model.init_args.handoff, experiment=config.experiment)

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand]
        run_dir = Path(config.trainer.default_root_dir)
        callbacks = [
            LastEveryEpochCheckpoint(
                dirpath=run_dir / "checkpoints",
                filename="best-epoch{epoch:03d}",
                auto_insert_metric_name=False,
                monitor=declared_monitor(type(self.model)),  # multi-label: val/mean_auroc
                mode="max",
                save_last=True,
            ),
            ResultsWriter(experiment=self.paths.experiment, stage=self.paths.stage),
            FiniteLossGuard(),
            ValidationOnlySelection(),
            RNGStateInCheckpoint(),
            SaveOnPreemption(),
        ]
        if self.paths.stage == "stage1":
            callbacks.append(StageHandoff(experiment_manifest=str(self.paths.handoff)))
        if self.model.hparams.get("feature_cache"):  # RebalancedHeadModule's model.feature_cache
            callbacks.append(FeatureCache())
        self.trainer_defaults["callbacks"] = callbacks
        if config.trainer.logger is None or config.trainer.logger is True:
            kwargs.setdefault("logger", self._loggers(run_dir, config))
        if config.trainer.get("plugins") is None:
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])  # atomic saves, weights_only loads
        if require(self.datamodule, RankShardedData, "the CLI (use_distributed_sampler)").shards_by_rank:
            kwargs.setdefault("use_distributed_sampler", False)  # the DataModule shards by rank
        return super().instantiate_trainer(**kwargs)

    def _loggers(self, run_dir: Path, config) -> list:
        segment = self.resume.segment or ""  # a resumed run logs into <run>/resumes/<time>/
        if self.resume.checkpoint is not None and self.trainer_is_rank_zero():
            write_resume_record(run_dir / segment, self.resume)
        loggers = [CSVLogger(save_dir=str(run_dir), name="", version=segment)]
        offline = wandb_offline(config.wandb)
        if offline is not None:
            from lightning.pytorch.loggers import WandbLogger

            loggers.append(
                WandbLogger(
                    project=config.wandb_project,
                    name=f"{self.paths.experiment}/{self.paths.stage}/{run_dir.name}",
                    group=self.paths.experiment,
                    job_type=self.paths.stage,
                    save_dir=str(run_dir),
                    offline=offline,
                    # explicit: Lightning signals offline only through WANDB_MODE, which wandb's
                    # settings ignore once another wandb.init ran in this process
                    mode="offline" if offline else "online",
                )
            )
        return loggers

    @staticmethod
    def trainer_is_rank_zero() -> bool:
        return all(os.environ.get(k, "0") == "0" for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))

    # --- fit, then test the checkpoint chosen on validation ------------------------------------
    def after_fit(self) -> None:
        if not self.config[self.subcommand].test_after_fit or self.trainer.interrupted:
            return
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if best else None)


def resolve_class(class_path: str) -> type:
    """The class a config's ``class_path`` names (already checked by ``check_class_paths``)."""
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"model.class_path {class_path!r} cannot be imported: {error}") from error


TOOLS = {  # medmetric <tool> ...: commands beside LightningCLI's
    "report": "medmetric.experiments.report",
    "check-data": "medmetric.experiments.check_data",
    "index": "medmetric.experiments.index",
    "search": "medmetric.experiments.search",
}
_CURRENT_RUN: dict[str, Path | None] = {"dir": None}  # the run folder made by this process, if any


def mark_failed(error: BaseException) -> None:
    """Leave ``FAILED`` (the error) in the run folder so no one mistakes it for a finished run."""
    run_dir = _CURRENT_RUN["dir"]
    if run_dir is not None and run_dir.is_dir() and os.environ.get("LOCAL_RANK", "0") == "0":
        text = f"{type(error).__name__}: {error}\n".encode()
        try:
            atomic_write(run_dir / "FAILED", lambda handle: handle.write(text), what="failure marker")
        except OSError:
            pass  # e.g. the disk is full: the original error matters more


def main(args: list[str] | None = None):
    """Console script ``medmetric`` and ``python -m medmetric.experiments``: fit/validate/test/predict or a tool."""
    args = args if args is not None else sys.argv[1:]
    if args and args[0] in TOOLS:
        import importlib

        return sys.exit(importlib.import_module(TOOLS[args[0]]).main(args[1:]))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _CURRENT_RUN["dir"] = None
    prescan_args(args)  # untrusted class paths are refused before jsonargparse imports them
    try:
        return MedMetricCLI(args=args)
    except BaseException as error:  # SystemExit of a bad flag too: it may come after the folder exists
        if not (isinstance(error, SystemExit) and error.code in (0, None)):
            mark_failed(error)
        raise


def console_main() -> None:
    """The ``medmetric`` console script: exit 0 after a finished fit, the tool's code after a tool.

    (``main`` returns the CLI object for tests and notebooks; handing that to ``sys.exit`` made
    every successful run exit 1.)"""
    main()
    sys.exit(0)
