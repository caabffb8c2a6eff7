"""Time per optimizer step() on a GPT-shaped parameter set, as ratios.

Every optimizer steps on its own copy of the same parameters and gradients
(148 tensors, 24.8M parameters: a 12-layer, width-384 GPT with an 8192-token
vocabulary). The optimizers take turns, round after round, so that the
machine's noise falls on all of them alike; each figure is the median over
rounds, and the ratio is to torch's fused AdamW measured in the same run.

    python benchmarks/step_time.py [--rounds 7] [--steps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import e_dist


def gpt_shapes(
    layers: int = 12, width: int = 384, vocab: int = 8192, context: int = 1024
):
    shapes = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [
            (width,), (width,),  # ln_1
            (3 * width, width), (3 * width,),  # attention qkv
            (width, width), (width,),  # attention out
            (width,), (width,),  # ln_2
            (4 * width, width), (4 * width,),  # mlp up
            (width, 4 * width), (width,),  # mlp down
        ]  # fmt: skip
    return [*shapes, (width,), (width,)]  # ln_f


def make_params(shapes, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params.append(p)
    return params


def groups(params):
    decay = [p for p in params if p.dim() > 1]
    rest = [p for p in params if p.dim() <= 1]
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0}]


def candidates() -> dict[str, Callable[[list], torch.optim.Optimizer]]:
    out = {
        "torch AdamW fused": lambda p: torch.optim.AdamW(
            groups(p), lr=1e-3, fused=True
        ),
        "torch AdamW foreach": lambda p: torch.optim.AdamW(
            groups(p), lr=1e-3, foreach=True
        ),
        "e_dist ALTO": lambda p: e_dist.ALTO(groups(p), lr=1e-2),
        "e_dist E over AdamW fused": lambda p: e_dist.E(
            torch.optim.AdamW(groups(p), lr=1e-3, fused=True)
        ),
        "e_dist ALTO reference path": lambda p: e_dist.ALTO(
            groups(p), lr=1e-2, implementation="reference"
        ),
    }
    try:
        import ALTO as reference  # the authors' package, if installed

        out["reference ALTO (e-optimizer-adaptor)"] = lambda p: reference.ALTO(
            groups(p), lr=1e-2, betas=(0.99, 0.9, 0.99), alp=-5, eps=1e-6
        )
    except ImportError:
        pass
    return out


def state_bytes_per_param(opt: torch.optim.Optimizer, numel: int) -> float:
    total = sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
    return total / numel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps timed per round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    shapes = gpt_shapes(vocab=args.vocab)
    numel = sum(torch.Size(s).numel() for s in shapes)
    print(
        f"{len(shapes)} tensors, {numel / 1e6:.1f}M parameters, {args.threads} threads"
    )
    runs = {}
    for name, make in candidates().items():
        params = make_params(shapes)
        opt = make(params)
        opt.step()  # state allocation and kernel build happen outside timing
        runs[name] = (opt, params)

    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (opt, _) in runs.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)

    baseline = statistics.median(times["torch AdamW fused"])
    print(
        f"{'optimizer':40} {'ms/step':>8} {'vs fused AdamW':>15} {'state B/param':>14}"
    )
    for name, (opt, _) in runs.items():
        ms = statistics.median(times[name])
        state = state_bytes_per_param(opt, numel)
        print(f"{name:40} {ms:8.1f} {ms / baseline:14.2f}x {state:14.1f}")


if __name__ == "__main__":
    main()
