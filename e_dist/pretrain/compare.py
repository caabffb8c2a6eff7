"""``--compare``: the same model, data, batch and step budget for each optimizer.

Every optimizer runs over its learning-rate grid and several seeds, all in one
process group. The learning rate with the lowest mean final evaluation loss
over seeds is its tuned one (tuned on the held-out split it is reported on,
as small-scale comparisons usually are). Rank 0 writes ``RUNS/NAME/``:
``compare.json`` (every run), ``compare.md`` (the table) and ``compare.png``
(evaluation loss of each tuned optimizer, mean over seeds).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path
from typing import Any

import torch.distributed as dist

DEFAULT_GRIDS = {
    "ALTO": (3e-3, 1e-2, 3e-2),
    "LAMB": (3e-3, 1e-2, 3e-2),
    "AdamW": (3e-4, 1e-3, 3e-3),
    "EAdamW": (3e-4, 1e-3, 3e-3),
}


def parse_grid(text: str | None) -> dict[str, tuple[float, ...]]:
    """``"ALTO=3e-3,1e-2;AdamW=1e-3"`` over the defaults."""
    grids = dict(DEFAULT_GRIDS)
    for part in filter(None, (text or "").split(";")):
        name, _, values = part.partition("=")
        if name not in DEFAULT_GRIDS or not values:
            raise ValueError(f"--lr-grid: expected NAME=LR,LR,... with NAME in "
                             f"{sorted(DEFAULT_GRIDS)}, got {part!r}")  # fmt: skip
        grids[name] = tuple(float(v) for v in values.split(","))
    return grids


def compare(args: argparse.Namespace, run) -> dict[str, Any]:
    """Run every optimizer x learning rate x seed; returns the summary."""
    optimizers = args.compare.split(",")
    grids = parse_grid(args.lr_grid)
    seeds = range(args.seed, args.seed + args.seeds)
    results = []
    for name in optimizers:
        for lr in grids[name]:
            for seed in seeds:
                one = copy.copy(args)
                one.optimizer, one.lr, one.seed = name, lr, seed
                one.name = f"{args.name}/{name}-lr{lr:g}-seed{seed}"
                one.resume, one.progress = False, False
                final = run(one)
                results.append({"optimizer": name, "lr": lr, "seed": seed, **final})
    summary = summarize(results, optimizers, grids)
    if dist.get_rank() == 0:
        out = Path(args.runs) / args.name
        (out / "compare.json").write_text(
            json.dumps({"runs": results, "summary": summary}, indent=1)
        )
        (out / "compare.md").write_text(table(summary, args))
        plot(summary, out, args)
    return summary


def summarize(results, optimizers, grids) -> list[dict[str, Any]]:
    summary = []
    for name in optimizers:
        by_lr = {}
        for lr in grids[name]:
            losses = [
                r["loss"] for r in results if r["optimizer"] == name and r["lr"] == lr
            ]
            by_lr[lr] = losses
        best = min(by_lr, key=lambda lr: statistics.fmean(by_lr[lr]))
        losses = by_lr[best]
        ppl = [
            r["perplexity"]
            for r in results
            if r["optimizer"] == name and r["lr"] == best
        ]
        summary.append({
            "optimizer": name, "grid": list(grids[name]), "best_lr": best,
            "loss_mean": statistics.fmean(losses),
            "loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "perplexity_mean": statistics.fmean(ppl),
            "perplexity_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
            "seeds": len(losses),
        })  # fmt: skip
    return summary


def table(summary, args) -> str:
    lines = [
        f"Preset {args.preset}, {args.steps} steps, micro-batch {args.micro_batch} x "
        f"accumulation {args.accumulation} x {dist.get_world_size()} ranks, "
        f"{args.seeds} seeds, backend {args.backend}.",
        "",
        "| optimizer | lr grid | tuned lr | final eval loss | eval perplexity |",
        "|---|---|---|---|---|",
    ]
    for s in summary:
        grid = ", ".join(f"{lr:g}" for lr in s["grid"])
        lines.append(
            f"| {s['optimizer']} | {grid} | {s['best_lr']:g} | "
            f"{s['loss_mean']:.4f} ± {s['loss_std']:.4f} | "
            f"{s['perplexity_mean']:.2f} ± {s['perplexity_std']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary, out: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summary:
        curves = []
        for seed in range(args.seed, args.seed + args.seeds):
            path = (
                out
                / f"{s['optimizer']}-lr{s['best_lr']:g}-seed{seed}"
                / "metrics.jsonl"
            )
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            curves.append([(r["step"], r["loss"]) for r in rows if r["kind"] == "eval"])
        steps = [step for step, _ in curves[0]]
        mean = [statistics.fmean(c[i][1] for c in curves) for i in range(len(steps))]
        ax.plot(steps, mean, "o-", label=f"{s['optimizer']} (lr {s['best_lr']:g})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"eval loss (mean of {args.seeds} seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    batch = args.micro_batch * args.accumulation * dist.get_world_size()
    ax.set_title(f"global batch {batch} sequences")
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=100)
    plt.close(fig)
