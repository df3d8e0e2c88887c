"""``python -m experiments fit --config experiments/ham10000/stage1.yaml [--flags]``.

Also runnable as a file, ``python experiments/__main__.py fit ...``, which is how a W&B sweep
agent starts ``${program}``: the repository this file lives in is then put first on the path.
"""

import sys
from pathlib import Path

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
