"""``python -m experiments fit --config experiments/ham10000/stage1.yaml [--flags]``."""

from experiments.cli import main

if __name__ == "__main__":
    main()
