"""The pretraining loop, for DeepSpeed and FSDP2 alike.

Start it on every rank (``torchrun``, the ``deepspeed`` launcher, ``srun``);
the usual torch.distributed environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)
says where the others are. Everything the run writes goes to
``RUNS/NAME/``: ``metrics.jsonl`` (one line per step and per evaluation),
TensorBoard events where the ``tensorboard`` package is installed,
``curves.png``, ``checkpoints/``.

Crash safety: a checkpoint ``checkpoints/stepNNNNNNN/`` counts as complete
once rank 0 has written its manifest (:func:`e_dist.checkpoint.io.commit`),
after every rank has written its files; ``checkpoints/latest`` then names it.
A run killed at any moment leaves ``latest`` naming a complete checkpoint,
and ``--resume`` checks it against its manifest before loading anything.
For tests, :data:`FAULT_ENV` makes a rank kill itself at a chosen point
(see :func:`fault_injection`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import e_dist
from e_dist import registry
from e_dist.checkpoint import io as checkpoint_io
from e_dist.pretrain.data import TokenData, embedded_corpus, shard_directory
from e_dist.pretrain.model import GPT, PRESETS

logger = logging.getLogger("e_dist.pretrain")

OPTIMIZERS = ("ALTO", "LAMB", "AdamW", "EAdamW")
ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m e_dist.pretrain",
        description="Large-batch GPT pretraining with ALTO on DeepSpeed or FSDP2.",
    )
    p.add_argument("--backend", choices=("deepspeed", "fsdp"), default="deepspeed")
    p.add_argument(
        "--ds-config",
        default=str(ROOT / "ds_configs" / "alto_zero2_bf16.json"),
        help="DeepSpeed config; batch sizes and optimizer come from the flags",
    )
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="ALTO")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--data", help="directory of *.npy / *.bin token shards")
    p.add_argument("--vocab-size", type=int, help="vocabulary of --data")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per rank")
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--lr", type=float, help="peak learning rate (default by optimizer)")
    p.add_argument("--alpha", type=float, help="E's alpha (default: the paper's rule)")
    p.add_argument("--beta", type=float, help="E's beta / ALTO's betas[0]")
    p.add_argument(
        "--weight-decay", type=float, help="default 1e-4 (ALTO), 0.1 (AdamW)"
    )
    p.add_argument("--warmup", type=int, default=20, help="warmup steps")
    p.add_argument("--schedule", choices=("cosine", "linear"), default="cosine")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="global gradient norm clip")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument(
        "--keep-checkpoints",
        type=int,
        help="keep only the last K checkpoints (default: keep all)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint"
    )
    p.add_argument(
        "--init-from",
        help="start from a consolidated checkpoint (python -m e_dist.checkpoint "
        "consolidate): another backend's or world size's run, continued at its step",
    )
    p.add_argument(
        "--until",
        type=int,
        help="stop after this step (a time-limited job); the schedule stays --steps'",
    )
    p.add_argument("--name", default="demo", help="run name")
    p.add_argument("--runs", default="runs", help="directory of runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--compare",
        help="comma-separated optimizers to compare (e.g. ALTO,LAMB,AdamW,EAdamW)",
    )
    p.add_argument("--seeds", type=int, default=2, help="seeds per setting (--compare)")
    p.add_argument(
        "--lr-grid",
        help="learning rates per optimizer (--compare), 'ALTO=3e-3,1e-2;...'",
    )
    # The deepspeed launcher passes it; LOCAL_RANK in the environment says the same.
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in (
        "steps",
        "micro_batch",
        "accumulation",
        "eval_every",
        "checkpoint_every",
    ):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.init_from and args.resume:
        p.error("--init-from starts a run; --resume continues one: pick one")
    if args.init_from and not Path(args.init_from).is_file():
        p.error(f"--init-from: {args.init_from} is not a file")
    if args.keep_checkpoints is not None and args.keep_checkpoints <= 0:
        p.error("--keep-checkpoints must be positive (leave it out to keep all)")
    if args.compare:
        unknown = [o for o in args.compare.split(",") if o not in OPTIMIZERS]
        if unknown:
            p.error(
                f"--compare: unknown optimizers {unknown}; known: {list(OPTIMIZERS)}"
            )
        if args.seeds <= 0:
            p.error("--seeds must be positive")
    return args


DEFAULT_LR = {"ALTO": 1e-2, "LAMB": 1e-2, "AdamW": 1e-3, "EAdamW": 1e-3}


def optimizer_spec(args: argparse.Namespace, global_batch: int) -> tuple[str, dict]:
    """The registry name and keyword arguments for ``--optimizer``.

    LAMB is ALTO with alpha=0: the same bias-corrected, layer-adapted update
    without E's exploration.
    """
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    preset = e_dist.alto_preset(global_batch)
    alpha = args.alpha if args.alpha is not None else preset["alpha"]
    beta = args.beta if args.beta is not None else preset["betas"][0]
    if args.optimizer in ("ALTO", "LAMB"):
        wd = 1e-4 if args.weight_decay is None else args.weight_decay
        alpha = 0.0 if args.optimizer == "LAMB" else alpha
        return "ALTO", {
            "lr": lr,
            "alpha": alpha,
            "betas": (beta, 0.9, 0.99),
            "weight_decay": wd,
        }
    wd = 0.1 if args.weight_decay is None else args.weight_decay
    kwargs = {"lr": lr, "betas": (0.9, 0.95), "weight_decay": wd}
    if args.optimizer == "AdamW":
        return "AdamW", kwargs
    return "EAdamW", {**kwargs, "alpha": alpha, "beta": beta}


def learning_rate(args: argparse.Namespace, peak: float, step: int) -> float:
    """Linear warmup, then cosine or linear decay to ``min_lr_ratio * peak``."""
    if step < args.warmup:
        return peak * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    progress = min(1.0, progress)
    if args.schedule == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        shape = 1 - progress
    return peak * (args.min_lr_ratio + (1 - args.min_lr_ratio) * shape)


FAULT_ENV = "E_DIST_FAULT_INJECT"
FAULT_POINTS = ("after_step", "mid_save")


def fault_injection(rank: int) -> tuple[str, int] | None:
    """Where this rank kills itself, as ``(point, step)``, or None: read from
    the environment variable ``E_DIST_FAULT_INJECT``, for crash-safety tests.

    ``E_DIST_FAULT_INJECT="kill:rank=1:step=7:point=after_step"`` makes rank 1
    send itself SIGKILL at that point of step 7 (steps count from 1, as in
    ``metrics.jsonl``); the other ranks carry on and run into it. Points:

    - ``after_step``: after the step's optimizer step, before any checkpoint
      of that step is written (a crash between two checkpoints);
    - ``mid_save``: while the checkpoint of that step is saved, after this
      rank has written its files and before the checkpoint is committed, so
      it is left on disk incomplete.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    fields = dict(item.partition("=")[::2] for item in spec.split(":")[1:])
    if (
        not spec.startswith("kill:")
        or set(fields) != {"rank", "step", "point"}
        or not fields["rank"].isdigit()
        or not fields["step"].isdigit()
        or fields["point"] not in FAULT_POINTS
    ):
        raise ValueError(
            f"{FAULT_ENV}={spec!r}: expected 'kill:rank=R:step=S:point=P' with P "
            f"one of {FAULT_POINTS}"
        )
    if int(fields["rank"]) != rank:
        return None
    return fields["point"], int(fields["step"])


class Metrics:
    """metrics.jsonl, TensorBoard and curves.png, written by rank 0 only."""

    def __init__(self, run: Path, resume_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = run / "metrics.jsonl"
        self.run = run
        self.writer = None
        if not enabled:
            return
        kept = []
        if resume_step and self.path.exists():  # drop rows past the checkpoint
            for line in self.path.read_text().splitlines():
                row = json.loads(line)
                if row["step"] <= resume_step:
                    kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                str(run / "tensorboard"), purge_step=resume_step + 1
            )
        except ImportError:
            logger.warning(
                "tensorboard is not installed; metrics go to metrics.jsonl only"
            )

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{row['kind']}/{key}", value, row["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.close()
        plot_curves(self.path, self.run / "curves.png")


def plot_curves(metrics: Path, out: Path, title: str | None = None) -> None:
    """Loss and perplexity against step, training and evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("loss", "perplexity"), strict=True):
        ax.plot(
            [r["step"] for r in train], [r[key] for r in train], label="train", lw=1
        )
        if evals:
            ax.plot(
                [r["step"] for r in evals], [r[key] for r in evals], "o-", label="eval"
            )
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key)
        ax.set_yscale("log" if key == "perplexity" else "linear")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or metrics.parent.name)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


class Trainer:
    """One backend's model, optimizer, step, evaluation and checkpoints."""

    def __init__(self, args: argparse.Namespace, data: TokenData) -> None:
        self.args = args
        self.data = data
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.global_batch = args.micro_batch * args.accumulation * self.world
        config = PRESETS[args.preset]
        self.config = type(config)(**{**config.__dict__, "vocab_size": data.vocab_size})
        torch.manual_seed(args.seed)
        model = GPT(self.config)
        self.num_params = sum(p.numel() for p in model.parameters())
        self.name, self.kwargs = optimizer_spec(args, self.global_batch)
        self.peak_lr = self.kwargs["lr"]
        self.fault = fault_injection(self.rank)
        if args.backend == "deepspeed":
            self._init_deepspeed(model)
        else:
            self._init_fsdp(model)

    # -- DeepSpeed ---------------------------------------------------------
    def _init_deepspeed(self, model: torch.nn.Module) -> None:
        import deepspeed

        args = self.args
        with open(args.ds_config) as f:
            config = json.load(f)
        config.pop("train_batch_size", None)
        config["train_micro_batch_size_per_gpu"] = args.micro_batch
        config["gradient_accumulation_steps"] = args.accumulation
        config["gradient_clipping"] = args.clip
        config["steps_per_print"] = 10**9
        if not args.bf16:
            config.pop("bf16", None)
            config.pop("data_types", None)
        params = dict(self.kwargs)
        if self.name == "AdamW" and not torch.cuda.is_available():
            params["torch_adam"] = True  # no FusedAdam build on CPU
        config["optimizer"] = {"type": self.name, "params": params}
        if args.init_from:  # loaded through a universal checkpoint
            config["checkpoint"] = {**config.get("checkpoint", {})}
            config["checkpoint"]["load_universal"] = True
        self.engine, *_ = deepspeed.initialize(model=model, config=config)
        self.model = self.engine
        self.optimizer = self.engine.basic_optimizer

    def _ds_step(self, step: int) -> float:
        losses = []
        for micro in range(self.args.accumulation):
            tokens, targets = self._batch(step, micro)
            loss = self.engine(tokens, targets)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
        return torch.stack(losses).mean()

    # -- FSDP2 -------------------------------------------------------------
    def _init_fsdp(self, model: torch.nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        device = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device, (self.world,))
        mp = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
        kwargs = {"mesh": mesh, **({"mp_policy": mp} if self.args.bf16 else {})}
        model.to(device)
        for block in model.blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        self.model = model
        groups = e_dist.weight_decay_groups(model, self.kwargs["weight_decay"])
        if self.name == "AdamW":
            self.optimizer = torch.optim.AdamW(groups, **self.kwargs)
        elif self.name == "ALTO":
            self.optimizer = registry.build(
                "ALTO", groups, max_grad_norm=self.args.clip, **self.kwargs
            )
        else:
            self.optimizer = registry.build(self.name, groups, **self.kwargs)

    def _fsdp_step(self, step: int) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for micro in range(self.args.accumulation):
            tokens, targets = self._batch(step, micro)
            loss = self.model(tokens, targets)
            (loss / self.args.accumulation).backward()
            losses.append(loss.detach().float())
        if not isinstance(self.optimizer, e_dist.ALTO):  # ALTO clips itself
            self._grad_norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), self.args.clip
            )
        self.optimizer.step()
        return torch.stack(losses).mean()

    # -- common ------------------------------------------------------------
    def _batch(self, step: int, micro: int):
        tokens, targets = self.data.batch(
            "train", self.args.micro_batch, self.config.context, self.args.seed,
            step * self.args.accumulation + micro, self.rank, self.world,
        )  # fmt: skip
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return tokens.to(device), targets.to(device)

    def set_lr(self, lr: float) -> None:
        if self.args.backend == "deepspeed":
            groups = self.engine.optimizer.param_groups
        else:
            groups = self.optimizer.param_groups
        for group in groups:
            group["lr"] = lr

    def train_step(self, step: int) -> dict[str, float]:
        self._grad_norm = None
        if self.args.backend == "deepspeed":
            loss = self._ds_step(step)
            norm = self.engine.get_global_grad_norm()
        else:
            loss = self._fsdp_step(step)
            norm = self._grad_norm
            if norm is None:
                norm = getattr(self.optimizer, "last_grad_norm", None)
        dist.all_reduce(loss)
        loss = float(loss) / self.world
        row = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if norm is not None:
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
            row["grad_norm"] = float(norm)
        # ALTO's ratios, each parameter once over all ranks (a collective).
        gather = getattr(self.optimizer, "gather_trust_ratios", None)
        ratios = gather() if gather is not None else None
        if ratios is not None and ratios.numel():
            ratios = ratios.float()
            row["trust_ratio_min"] = float(ratios.min())
            row["trust_ratio_median"] = float(ratios.median())
            row["trust_ratio_max"] = float(ratios.max())
        return row

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        total = torch.zeros(())
        for i in range(self.args.eval_batches):
            tokens, targets = self.data.batch(
                "val", self.args.micro_batch, self.config.context, self.args.seed + 1,
                i, self.rank, self.world,
            )  # fmt: skip
            total += self.model(tokens, targets).float().cpu()
        loss = float(total) / self.args.eval_batches
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    # -- checkpoints ---------------------------------------------------------
    def inject_fault(self, point: str, step: int) -> None:
        """SIGKILL this process if :data:`FAULT_ENV` names this point."""
        if self.fault == (point, step):
            logger.warning("%s: rank %d kills itself (%s)", FAULT_ENV, self.rank, point)
            os.kill(os.getpid(), signal.SIGKILL)

    def save(self, directory: Path, step: int) -> None:
        """A checkpoint of everything at ``step``, in ``directory/stepNNNNNNN``.

        Every rank writes its files; after a barrier, rank 0 commits the
        checkpoint (a manifest of every file's size and SHA-256, written
        atomically and last) and then points ``latest`` at it, atomically. A
        crash at any moment leaves ``latest`` naming a complete checkpoint.
        """
        tag = f"step{step:07d}"
        tag_dir = directory / tag
        if self.rank == 0 and tag_dir.exists():  # left incomplete by a crash
            (tag_dir / checkpoint_io.MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(tag_dir)
        dist.barrier()
        if self.args.backend == "deepspeed":
            # DeepSpeed would write `latest` itself, from rank 0 as soon as its
            # own files are written, before the other ranks are done.
            self.engine.save_checkpoint(
                str(directory), tag=tag, client_state={"step": step}, save_latest=False
            )
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_state, optim_state = get_state_dict(self.model, self.optimizer)
            dcp.save(
                {"model": model_state, "optim": optim_state},
                checkpoint_id=str(tag_dir),
            )
        self.inject_fault("mid_save", step)
        dist.barrier()  # every rank's files are on disk
        if self.rank == 0:
            info = {
                "step": step,
                "backend": self.args.backend,
                "world_size": self.world,
            }
            checkpoint_io.commit(tag_dir, info)
            checkpoint_io.write_latest(directory, tag)
            if self.args.keep_checkpoints is not None:
                _prune(directory, step, self.args.keep_checkpoints)
        dist.barrier()

    def _checked_latest(self, directory: Path) -> str | None:
        """The tag ``latest`` names, once rank 0 has checked that checkpoint
        against its manifest; every rank raises the same CheckpointError if it
        is missing, incomplete or corrupted."""
        tag, problem = None, None
        if self.rank == 0:
            try:
                tag = checkpoint_io.read_latest(directory)
                if tag is not None:
                    checkpoint_io.verify(directory / tag)
            except (checkpoint_io.CheckpointError, OSError) as err:
                problem = str(err) + _complete_elsewhere(directory, tag)
        box = [tag, problem]
        dist.broadcast_object_list(box, src=0)
        tag, problem = box
        if problem is not None:
            raise checkpoint_io.CheckpointError(problem)
        return tag

    def init_from(self, path: Path, workdir: Path) -> int:
        """Load a consolidated checkpoint (any backend, any world size);
        returns the step it was written at."""
        from e_dist.checkpoint import consolidated

        if self.args.backend == "fsdp":
            meta = consolidated.load_into(self.model, self.optimizer, path)
        else:
            from e_dist.checkpoint import universal

            folder = workdir / "init-from"
            error = None
            if self.rank == 0:
                try:
                    shutil.rmtree(folder, ignore_errors=True)
                    universal.write(consolidated.load(path), folder / "t")
                except checkpoint_io.CheckpointError as err:
                    error = str(err)
            shared = [error]
            dist.broadcast_object_list(shared, src=0)
            if shared[0] is not None:
                raise checkpoint_io.CheckpointError(shared[0])
            _, client = self.engine.load_checkpoint(str(folder), tag="t")
            meta = {"client_state": client, "global_steps": client.get("step", 0)}
        client = meta.get("client_state") or {}
        return int(client.get("step", meta.get("global_steps", 0)))

    def load(self, directory: Path) -> int:
        """Restore the checkpoint ``latest`` names, after checking it is
        complete and intact; returns its step (0 if there is none)."""
        tag = self._checked_latest(directory)
        if tag is None:
            return 0
        if self.args.backend == "deepspeed":
            _, client = self.engine.load_checkpoint(str(directory), tag=tag)
            return int(client["step"])
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_state_dict,
            set_state_dict,
        )

        # State must exist to be loaded into: one step at lr 0 creates it.
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        if not any(optim_state.get("state", {}).values()):
            self.set_lr(0.0)
            self._fsdp_step(0)
            model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(directory / tag))
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )
        return int(tag.removeprefix("step"))


_TAG = re.compile(r"step(\d{7})")


def _tags(directory: Path) -> list[tuple[int, str]]:
    """``(step, tag)`` of every checkpoint directory, complete or not, by step."""
    found = []
    for path in directory.iterdir():
        match = _TAG.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path.name))
    return sorted(found)


def _complete_elsewhere(directory: Path, bad: str | None) -> str:
    """The sentence naming the other complete checkpoints in ``directory``
    (checked by file sizes only), for an error about ``bad``."""
    complete = []
    for _, tag in _tags(directory) if directory.is_dir() else []:
        try:
            if tag != bad:
                checkpoint_io.verify(directory / tag, checksums=False)
                complete.append(tag)
        except checkpoint_io.CheckpointError:
            pass
    if not complete:
        return f". {directory} holds no other complete checkpoint."
    return (
        f". Complete checkpoints in {directory}: {', '.join(complete)}; to resume "
        f"from one of them, write its name into {directory / 'latest'}."
    )


def _prune(directory: Path, step: int, keep: int) -> None:
    """Delete all but the last ``keep`` checkpoints up to ``step``."""
    older = [tag for s, tag in _tags(directory) if s < step]
    for tag in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(directory / tag, ignore_errors=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train; returns the final evaluation."""
    data = (
        shard_directory(args.data, args.vocab_size) if args.data else embedded_corpus()
    )
    trainer = Trainer(args, data)
    rank = trainer.rank
    run_dir = Path(args.runs) / args.name
    checkpoints = run_dir / "checkpoints"
    if rank == 0:
        checkpoints.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    start = trainer.load(checkpoints) if args.resume else 0
    if args.init_from:
        start = trainer.init_from(Path(args.init_from), checkpoints)
        if rank == 0:
            logger.info("started from %s at step %d", args.init_from, start)
    if args.resume and start == 0 and rank == 0:
        latest = checkpoints / "latest"
        logger.warning("--resume: no %s, so no checkpoint; starting at step 0", latest)
    metrics = Metrics(run_dir, start, enabled=rank == 0)
    if rank == 0:
        logger.info(
            "%s on %s: GPT %s (%.1fM parameters), %s, global batch %d x %d tokens, "
            "steps %d-%d", args.optimizer, args.backend, args.preset,
            trainer.num_params / 1e6, data.source, trainer.global_batch,
            trainer.config.context, start, args.steps,
        )  # fmt: skip
    tokens_per_step = trainer.global_batch * trainer.config.context
    final = None
    stop = args.steps if args.until is None else min(args.until, args.steps)
    for step in range(start, stop):
        lr = learning_rate(args, trainer.peak_lr, step)
        trainer.set_lr(lr)
        began = time.perf_counter()
        row = trainer.train_step(step)
        elapsed = time.perf_counter() - began
        row = {"kind": "train", "step": step + 1, "lr": lr, **row}
        row["tokens_per_s"] = tokens_per_step / elapsed
        metrics.log(row)
        trainer.inject_fault("after_step", step + 1)
        if rank == 0 and args.progress:
            _progress(step + 1, args.steps, row)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            final = {"kind": "eval", "step": step + 1, **trainer.evaluate(step + 1)}
            metrics.log(final)
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == stop:
            trainer.save(checkpoints, step + 1)
    if rank == 0 and args.progress:
        sys.stderr.write("\n")
    metrics.close()
    if final is None:
        final = {"kind": "eval", "step": start, **trainer.evaluate(start)}
    if args.backend == "deepspeed":
        trainer.engine.destroy()
    return final


def _progress(step: int, total: int, row: dict[str, Any]) -> None:
    width = 30
    done = int(width * step / total)
    bar = "#" * done + "." * (width - done)
    line = (
        f"\r[{bar}] {step}/{total} loss {row['loss']:.4f} "
        f"lr {row['lr']:.2e} {row['tokens_per_s']:.0f} tok/s"
    )
    end = "" if sys.stderr.isatty() else "\n"
    sys.stderr.write(line + end)
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if args.backend == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
    else:
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        if args.compare:
            from e_dist.pretrain.compare import compare

            summary = compare(args, run)
            if dist.get_rank() == 0:
                print(json.dumps({"compare": summary}))
        else:
            final = run(args)
            if dist.get_rank() == 0:
                print(json.dumps({"final_eval": final}))
    finally:
        dist.barrier()
        dist.destroy_process_group()
