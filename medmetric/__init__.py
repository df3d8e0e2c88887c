"""medmetric: two-stage (metric-learning pretraining, then classifier re-balancing) training for
class-imbalanced medical data, on PyTorch Lightning.

The one import name the project installs. Its packages, in the one direction imports go
(a package may import only from those before it; ``tests/test_layers.py`` checks it):

======================================  ====================================================
``medmetric.run_io``                    crash-safe writes, JSON, hashing, manifests, run folders
``medmetric.datamodules``               sources, split planning, task datasets, samplers, loaders
``medmetric.text``                      label-text encoders and their embedding cache
``medmetric.lightning_modules``         LightningModules, backbones, heads, losses, metrics
``medmetric.callbacks``                 Lightning callbacks (handoff, results, cache, guards)
``medmetric.retrieval``                 embedder and on-disk index (the search tool: experiments)
``medmetric.experiments``               the CLI, the tools and the YAML configs
======================================  ====================================================

``lightning_modules/``, ``datamodules/``, ``callbacks/`` and ``experiments/`` stay top-level
folders of the repository (the design card's layout); ``pyproject.toml`` maps them into this
namespace with setuptools' ``package-dir``.
"""

__version__ = "0.2.0"
