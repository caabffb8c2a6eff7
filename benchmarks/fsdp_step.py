"""Optimizer step time on an FSDP2-sharded GPT on 2 CPU ranks, as ratios.

Each optimizer steps on its own copy of the same model (148 parameter
tensors, 24.8M parameters: 12 layers, width 384, context 1024, vocabulary
8192), sharded with ``fully_shard`` per block and at the root over 2 ranks,
with gradients from one backward pass. The optimizers take turns, round
after round; each figure is the median over rounds of the slower rank, and
the ratio is to torch's fused AdamW in the same run.

    python benchmarks/fsdp_step.py [--rounds 7] [--steps 5]

Run without RANK in the environment, it starts its own 2 ranks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from common import launch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps timed per round")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        launch(__file__, sys.argv[1:], world=2)
        return

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import e_dist
    from e_dist.pretrain.model import GPT, GPTConfig

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    config = GPTConfig(vocab_size=8192, context=1024, layers=12, width=384, heads=6)

    def sharded_model() -> torch.nn.Module:
        torch.manual_seed(0)
        model = GPT(config)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        tokens = torch.randint(0, config.vocab_size, (2, 65))
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        return model

    candidates = {
        "torch AdamW fused": lambda m: torch.optim.AdamW(
            e_dist.weight_decay_groups(m), lr=1e-3, fused=True
        ),
        "torch AdamW foreach": lambda m: torch.optim.AdamW(
            e_dist.weight_decay_groups(m), lr=1e-3, foreach=True
        ),
        "e_dist ALTO": lambda m: e_dist.ALTO(e_dist.weight_decay_groups(m), lr=1e-2),
        "e_dist E over AdamW fused": lambda m: e_dist.E(
            torch.optim.AdamW(e_dist.weight_decay_groups(m), lr=1e-3, fused=True)
        ),
    }
    runs = {}
    for name, make in candidates.items():
        model = sharded_model()
        optimizer = make(model)
        optimizer.step()  # state and kernels outside timing
        runs[name] = optimizer
    num_tensors = len(list(model.parameters()))
    numel = sum(p.numel() for p in model.parameters())

    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, optimizer in runs.items():
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                optimizer.step()
            elapsed = torch.tensor((time.perf_counter() - start) / args.steps * 1e3)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[name].append(float(elapsed))

    if dist.get_rank() == 0:
        base = statistics.median(times["torch AdamW fused"])
        print(
            f"FSDP2, {dist.get_world_size()} ranks, {num_tensors} parameter tensors, "
            f"{numel / 1e6:.1f}M parameters"
        )
        print(f"{'optimizer':30} {'ms/step':>8} {'vs fused AdamW':>15}")
        for name in runs:
            ms = statistics.median(times[name])
            print(f"{name:30} {ms:8.1f} {ms / base:14.2f}x")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
