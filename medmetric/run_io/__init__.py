"""Run I/O, the bottom layer every other package may use: crash-safe writes, JSON, hashing,
the handoff manifest, run folders and resume planning.

One place for these, so every writer gets the fsync and every reader the same checks:

* :mod:`~medmetric.run_io.atomic`: ``atomic_write`` (temp file, fsync, rename), JSON, sha256,
  ``load_checkpoint_safely`` (``weights_only=True``);
* :mod:`~medmetric.run_io.manifest`: the stage-1 handoff manifest (write, read, check);
* :mod:`~medmetric.run_io.run_folders`: ``runs/<experiment>/<stage>/<time>/``;
* :mod:`~medmetric.run_io.resume`: which run a ``fit --ckpt_path`` continues.

It imports nothing else of medmetric.
"""
