"""Run CLI fits as subprocesses and find their run folders: shared by the demo and reproduce.

Each fit is an ordinary ``python -m medmetric.experiments fit ...`` command, so every number a script
prints can be reproduced by hand with the command logged beside it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from medmetric.datamodules.synthetic import write_ham10000

REAL_HAM10000 = Path("../shared/data/ham10000")


def resolve_ham10000(data_dir: str | None, runs_dir: Path) -> tuple[Path, str]:
    """The given folder, else the real subset in ../shared, else a generated stand-in."""
    if data_dir:
        return Path(data_dir), "given"
    if (REAL_HAM10000 / "HAM10000_metadata.csv").is_file():
        return REAL_HAM10000, "real HAM10000 subset"
    synthetic = runs_dir / "demo" / "synthetic_ham10000"
    if not (synthetic / "HAM10000_metadata.csv").is_file():
        write_ham10000(synthetic, n_images=1200, seed=0)
    return synthetic, "synthetic HAM10000-format data (../shared/data/ham10000 not found)"


def run_fit(config: str, experiment: str, stage: str, flags: list[str], runs_dir: Path, log_dir: Path) -> Path:
    """Run one CLI fit; return the new run folder. The full output goes to a log file."""
    stage_dir = runs_dir / experiment / stage
    before = set(stage_dir.iterdir()) if stage_dir.is_dir() else set()
    command = [sys.executable, "-m", "medmetric.experiments", "fit", "--config", config, f"--experiment={experiment}", *flags]
    log_path = log_dir / f"{experiment}-{stage}.log"
    print(f"  {experiment} {stage}: {' '.join(command[1:])}", flush=True)
    start = time.time()
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
        raise SystemExit(f"{experiment} {stage} failed (exit {code}); last lines of {log_path}:\n{tail}")
    new = sorted(set(stage_dir.iterdir()) - before)
    print(f"    done in {time.time() - start:.0f} s -> {new[-1]}", flush=True)
    return new[-1]
