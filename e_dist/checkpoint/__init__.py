"""Checkpoints that survive a new world size, a new backend and a crash.

- :mod:`e_dist.checkpoint.consolidated`: one file with every whole parameter
  and its whole optimizer state, keyed by parameter name; written from and
  loaded into one process, FSDP2 and (through a universal checkpoint)
  DeepSpeed.
- :mod:`e_dist.checkpoint.zero`: reads DeepSpeed ZeRO-1/2/3 checkpoints,
  every optimizer state key included, into that form.
- :mod:`e_dist.checkpoint.universal`: writes DeepSpeed universal checkpoints
  with every state key, and loads them into ZeRO at any world size and stage.
- :mod:`e_dist.checkpoint.io`: atomic writes, completeness manifests, loading
  with ``weights_only=True`` and clear errors.

Command line: ``python -m e_dist.checkpoint --help``.
"""

from e_dist.checkpoint.io import CheckpointError

__all__ = ["CheckpointError"]
