"""``python -m medmetric.experiments fit --config experiments/ham10000/stage1.yaml [--flags]``.

Also runnable as a file, ``python experiments/__main__.py fit ...``, which is how a W&B sweep
agent starts ``${program}``; either way ``medmetric`` must be installed (``make setup``).
"""

from medmetric.experiments.cli import console_main

if __name__ == "__main__":
    console_main()
