"""Run an unchanged training script with e_dist's DeepSpeed names available.

    deepspeed --num_gpus 8 --module e_dist.run train.py --deepspeed_config ds.json
    python -m e_dist.run train.py ...

The script then finds ``"optimizer": {"type": "ALTO"}`` (or E, EAdam, EAdamW,
ESGD) in its DeepSpeed config without importing e_dist itself.
"""

from __future__ import annotations

import runpy
import sys

import e_dist  # noqa: F401 - installs the DeepSpeed hooks


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m e_dist.run SCRIPT [ARGS...]")
    # The script sees itself as argv[0], its own arguments after it; the
    # deepspeed launcher's --local_rank=N, placed before the script, moves
    # after it.
    launcher = [a for a in sys.argv[1:] if a.startswith("--local_rank")]
    rest = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    script, args = rest[0], rest[1:]
    sys.argv = [script, *launcher, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
