"""Command line: convert and check checkpoints.

    python -m e_dist.checkpoint universal SOURCE OUT
    python -m e_dist.checkpoint consolidate SOURCE OUT.pt
    python -m e_dist.checkpoint to-reference SRC DST --optimizer ALTO
    python -m e_dist.checkpoint from-reference SRC DST --optimizer ALTO
    python -m e_dist.checkpoint verify PATH

SOURCE is a DeepSpeed ZeRO-1/2/3 checkpoint's tag folder (e.g.
``checkpoints/global_step100``), an FSDP2 ``torch.distributed.checkpoint``
folder holding ``{"model": ..., "optim": ...}`` (the main job's), or a
consolidated ``.pt`` file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from e_dist.checkpoint import consolidated, io
from e_dist.checkpoint.io import CheckpointError


def _read(source: Path, trust: bool, optimizer: str | None) -> dict:
    """A consolidated file, a DCP folder or a ZeRO checkpoint's tag folder."""
    from e_dist.checkpoint import dcp, zero

    description = None
    if optimizer is not None:
        base = optimizer.split(":", 1)[1] if optimizer.startswith("E:") else None
        name = "E" if base else optimizer
        description = consolidated.describe_name(name, {"base": base})
    if source.is_file():
        return consolidated.load(source)
    if dcp.is_dcp(source):
        return dcp.read(source, description)
    return zero.read(source, trust=trust, optimizer=description)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m e_dist.checkpoint", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("universal", "a DeepSpeed universal checkpoint with every state key"),
        ("consolidate", "one file: whole parameters and optimizer state"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("source", type=Path)
        command.add_argument("out", type=Path)
        command.add_argument(
            "--optimizer",
            help="ALTO, EAdam, EAdamW, ESGD or E:<torch.optim class>, where the "
            "checkpoint does not say (an FSDP checkpoint of E)",
        )
        command.add_argument(
            "--trust-pickles",
            action="store_true",
            help="unpickle DeepSpeed files fully (weights_only=False); only for "
            "checkpoints you trust whose client state holds your own classes",
        )
    for name in ("to-reference", "from-reference"):
        command = commands.add_parser(
            name,
            help=f"convert an optimizer state dict {name.replace('-', ' ')} "
            "the format of e-optimizer-adaptor 0.1.0",
        )
        command.add_argument("source", type=Path)
        command.add_argument("out", type=Path)
        command.add_argument("--optimizer", choices=("ALTO", "E"), required=True)
        command.add_argument(
            "--beta",
            type=float,
            help="E's beta (from-reference: the reference keeps it outside its "
            "state dict)",
        )
    command = commands.add_parser("verify", help="check a checkpoint is complete")
    command.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "universal":
            from e_dist.checkpoint import universal

            out = universal.write(
                _read(args.source, args.trust_pickles, args.optimizer), args.out
            )
            print(
                f'wrote {out}; load it with "checkpoint": {{"load_universal": '
                f"true}} and engine.load_checkpoint({str(out.parent)!r}, "
                f"tag={out.name!r})"
            )
        elif args.command == "consolidate":
            ckpt = _read(args.source, args.trust_pickles, args.optimizer)
            consolidated.save(ckpt, args.out)
            print(
                f"wrote {args.out} ({consolidated.label(ckpt['optimizer'])}, "
                f"{len(ckpt['model'])} parameters)"
            )
        elif args.command in ("to-reference", "from-reference"):
            from e_dist.checkpoint import reference

            reference.convert_file(
                args.source, args.out, args.command, args.optimizer, beta=args.beta
            )
            print(f"wrote {args.out}")
        else:
            if args.path.is_dir():
                manifest = io.verify(args.path)
                print(f"{args.path}: complete, {len(manifest['files'])} files")
            else:
                ckpt = consolidated.load(args.path)
                print(f"{args.path}: complete, {consolidated.label(ckpt['optimizer'])}")
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
