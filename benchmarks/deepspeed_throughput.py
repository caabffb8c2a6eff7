"""Training throughput under DeepSpeed ZeRO-2 on 2 CPU ranks, as ratios.

One engine per optimizer, all built on the same GPT-style model (seed 0) in
one process group: ALTO and E over AdamW from e_dist, and DeepSpeed's own
AdamW, both FusedAdam (the default, a compiled op) and torch's AdamW
(``"torch_adam": true``). The engines take turns, round after round, so the
machine's noise falls on all alike; the figure per optimizer is the median
tokens/s over rounds, and ratios are to DeepSpeed's FusedAdam AdamW.

    python benchmarks/deepspeed_throughput.py [--rounds 5] [--steps 3]

Run without RANK in the environment, it starts its own 2 ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from common import launch

OPTIMIZERS = {
    "DeepSpeed AdamW (FusedAdam)": {"type": "AdamW", "params": {"lr": 1e-3}},
    "DeepSpeed AdamW (torch)": {
        "type": "AdamW",
        "params": {"lr": 1e-3, "torch_adam": True},
    },
    "e_dist ALTO": {"type": "ALTO", "params": {"lr": 1e-2}},
    "e_dist EAdamW": {"type": "EAdamW", "params": {"lr": 1e-3}},
}
BASELINE = "DeepSpeed AdamW (FusedAdam)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--steps", type=int, default=3, help="optimizer steps per round"
    )
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()
    if "RANK" not in os.environ:
        launch(__file__, sys.argv[1:], world=2)
        return

    import deepspeed

    import e_dist  # noqa: F401 - the optimizer names
    from e_dist.pretrain.model import GPT, PRESETS

    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    config = PRESETS[args.preset]
    config = type(config)(**{**config.__dict__, "vocab_size": args.vocab})
    tokens_per_step = args.micro_batch * args.accumulation * world * config.context

    engines = {}
    for name, optimizer in OPTIMIZERS.items():
        torch.manual_seed(0)
        model = GPT(config)
        ds_config = {
            "train_micro_batch_size_per_gpu": args.micro_batch,
            "gradient_accumulation_steps": args.accumulation,
            "optimizer": optimizer,
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": 2},
            "steps_per_print": 10**9,
        }
        engines[name], *_ = deepspeed.initialize(model=model, config=ds_config)
    numel = sum(p.numel() for p in model.parameters())

    gen = torch.Generator().manual_seed(rank)

    def train(engine, steps: int) -> None:
        for _ in range(steps * args.accumulation):
            tokens = torch.randint(
                0,
                config.vocab_size,
                (args.micro_batch, config.context + 1),
                generator=gen,
            )
            loss = engine(tokens[:, :-1], tokens[:, 1:])
            engine.backward(loss)
            engine.step()

    for engine in engines.values():  # warm-up: state, compiled ops
        train(engine, 1)
    rates = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            start = time.perf_counter()
            train(engine, args.steps)
            rates[name].append(
                tokens_per_step * args.steps / (time.perf_counter() - start)
            )

    if rank == 0:
        base = statistics.median(rates[BASELINE])
        print(
            f"GPT {args.preset}: {numel / 1e6:.1f}M parameters, ZeRO-2, {world} ranks, "
            f"{tokens_per_step} tokens per optimizer step "
            f"({args.micro_batch} x {config.context} x {args.accumulation} "
            f"accumulation x {world})"
        )
        print(f"{'optimizer':30} {'tokens/s':>10} {'vs ' + BASELINE:>36}")
        for name in engines:
            rate = statistics.median(rates[name])
            print(f"{name:30} {rate:10.0f} {rate / base:35.2f}x")
        print("JSON " + json.dumps({k: statistics.median(v) for k, v in rates.items()}))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
