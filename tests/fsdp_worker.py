"""One rank of the FSDP tests: a sharded model against its single-process twin.

    python fsdp_worker.py SCENARIO JSON_ARGS

Every rank feeds the same batch, so the gradient FSDP averages is the
single-process one; each rank runs the twin itself and compares whole
parameters and optimizer state after every step. Rank 0 prints one
``RESULT {json}`` line per configuration.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from dist_harness import CollectiveCounter, report, worker_main
from models import max_rel_error, trust_ratios_compared
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

import e_dist
import e_dist.pieces

CLIP = 0.05  # small enough that ALTO's global-norm clip acts on most steps


class Net(nn.Module):
    """``head`` has 2 rows and ``scale`` 1 element: fewer than the ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.scale = nn.Parameter(torch.ones(1))
        self.head = nn.Linear(8, 2)
        self.out = nn.Linear(2, 11, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens[:, :-1])
        x = x + self.fc2(torch.relu(self.fc1(self.norm(x)))) * self.scale
        logits = self.out(torch.tanh(self.head(x))).float()
        return nn.functional.cross_entropy(
            logits.flatten(0, 1), tokens[:, 1:].flatten()
        )


def batch(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(300 + step)
    return torch.randint(0, 11, (4, 7), generator=gen)


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    groups = e_dist.weight_decay_groups(model, 1e-4)
    if name == "ALTO":
        return e_dist.ALTO(groups, lr=1e-2, max_grad_norm=CLIP)
    if name == "ALTO-noclip":
        return e_dist.ALTO(groups, lr=1e-2, max_grad_norm=None)
    if name == "ALTO-paper":
        return e_dist.ALTO(groups, lr=1e-2, max_grad_norm=CLIP, adaptation="paper")
    return e_dist.E(torch.optim.AdamW(groups, lr=1e-3), alpha=-5, beta=0.99)


STATE_KEYS = {
    "ALTO": ("exp_avg", "exp_avg_sq", "grad_ema"),
    "ALTO-paper": ("exp_avg", "exp_avg_sq", "grad_ema"),
    "ALTO-noclip": ("exp_avg", "exp_avg_sq", "grad_ema"),
    "EAdamW": ("exp_avg", "exp_avg_sq", "grad_ema"),
}


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard(model: nn.Module, kind: str, precision: str) -> tuple[nn.Module, dict]:
    """Wrap ``model`` the way ``kind`` says; returns it and facts to report."""
    world = dist.get_world_size()
    mp = {}
    if precision == "bf16":
        mp["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if kind == "fsdp2":
        mesh = init_device_mesh("cpu", (world,))
        for layer in (model.fc1, model.fc2, model.head):
            fully_shard(layer, mesh=mesh, **mp)
        fully_shard(model, mesh=mesh, **mp)
    elif kind == "hsdp":
        mesh = init_device_mesh(
            "cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")
        )
        fully_shard(model, mesh=mesh, **mp)
    elif kind == "tp":
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(
            model, mesh["tp"], {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}
        )
        fully_shard(model, mesh=mesh["dp"], **mp)
    elif kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(
            model, use_orig_params=True, device_id=torch.device("cpu")
        )
    else:
        raise ValueError(kind)
    return model, {}


def gathered(model: nn.Module, kind: str, optimizer, keys) -> tuple[list, list]:
    """Whole parameters and state, in the twin's parameter order."""
    if kind != "fsdp1":
        params = [full(p.detach()) for p in model.parameters()]
        states = [
            [full(optimizer.state[p][k]) if optimizer.state[p] else None for k in keys]
            for p in model.parameters()
        ]
        return params, states
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(model):
        params = [p.detach().clone() for p in model.parameters()]
    # State by hand from the flat parameter's layout: each rank's view covers
    # [intra_param_start_idx, intra_param_end_idx] of the flattened parameter.
    handle = model._handle
    flat = handle.flat_param
    where = {id(p): j for j, p in enumerate(flat._params)}
    states = []
    for p in model.parameters():
        j = where[id(p)]
        info = flat._shard_param_infos[j]
        row = []
        for key in keys:
            whole = torch.zeros(flat._shapes[j].numel(), dtype=torch.float64)
            if info.in_shard and optimizer.state[p]:
                start, end = info.intra_param_start_idx, info.intra_param_end_idx + 1
                whole[start:end] = optimizer.state[p][key].double()
            dist.all_reduce(whole, group=handle.process_group)
            row.append(whole)
        states.append(row)
    return params, states


def parity(args: dict) -> None:
    kind, precision = args["kind"], args.get("precision", "fp32")
    for name in args["optimizers"]:
        torch.manual_seed(0)
        model = Net()
        twin = copy.deepcopy(model)
        model, _ = shard(model, kind, precision)
        optimizer = make_optimizer(name, model)
        twin_optimizer = make_optimizer(name, twin)
        if args.get("shard_local_norms"):  # negative control
            optimizer.piece_map = e_dist.pieces.SINGLE_PROCESS
        worst_param = worst_state = 0.0
        for step in range(args["steps"]):
            optimizer.zero_grad()
            model(batch(step)).backward()
            # torch's clip_grad_norm_ cannot mix the meshes of FSDP and tensor
            # parallelism, so E runs unclipped there (ALTO clips itself).
            clip_e = name == "EAdamW" and kind != "tp"
            if clip_e:
                _clip(model, kind)
            optimizer.step()
            twin_optimizer.zero_grad()
            twin_backward(twin, step, precision)
            if clip_e:
                torch.nn.utils.clip_grad_norm_(twin.parameters(), CLIP)
            twin_optimizer.step()
            params, states = gathered(model, kind, optimizer, STATE_KEYS[name])
            for p, q, state in zip(params, twin.parameters(), states):
                worst_param = max(worst_param, max_rel_error(p.reshape(q.shape), q))
                for key, value in zip(STATE_KEYS[name], state):
                    if value is not None:
                        expected = twin_optimizer.state[q][key]
                        worst_state = max(
                            worst_state, max_rel_error(value.reshape(q.shape), expected)
                        )
        report(
            **trust_ratios_compared(optimizer, twin_optimizer),
            kind=kind, precision=precision, optimizer=name, world=dist.get_world_size(),
            piece_map=type(getattr(optimizer, "piece_map", None)).__name__,
            state_is_dtensor=_state_is_dtensor(optimizer),
            param_error=worst_param, state_error=worst_state,
        )  # fmt: skip


def twin_backward(twin: nn.Module, step: int, precision: str) -> None:
    """The twin's gradients. In bf16, as FSDP2's MixedPrecisionPolicy makes
    them: forward and backward on a bf16 copy of the fp32 parameters, the
    gradients cast to fp32."""
    if precision != "bf16":
        twin(batch(step)).backward()
        return
    low = copy.deepcopy(twin).bfloat16()
    low(batch(step)).backward()
    for p, q in zip(twin.parameters(), low.parameters()):
        p.grad = q.grad.float()


def _clip(model, kind):
    """The global clip E's users apply: FSDP1's own method; a DTensor-aware
    clip for FSDP2."""
    if kind == "fsdp1":
        model.clip_grad_norm_(CLIP)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)


def _state_is_dtensor(optimizer) -> bool | None:
    values = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    if not values:
        return None
    return all(isinstance(v, DTensor) for v in values)


def collectives(args: dict) -> None:
    counter = CollectiveCounter()
    kind = args["kind"]
    for name in args["optimizers"]:
        torch.manual_seed(0)
        model, _ = shard(Net(), kind, "fp32")
        optimizer = make_optimizer(name, model)
        for step in range(3):
            optimizer.zero_grad()
            model(batch(step)).backward()
            counter.reset()
            counter.inside = True
            optimizer.step()
            counter.inside = False
        report(kind=kind, optimizer=name, counts=dict(counter.counts))


def checkpoint(args: dict) -> None:
    """DCP save with get_optimizer_state_dict; a fresh model and optimizer load
    it with set_optimizer_state_dict, possibly on another world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    name, n, more = args["optimizer"], args["steps"], args["more"]
    torch.manual_seed(0)
    model, _ = shard(Net(), "fsdp2", "fp32")
    optimizer = make_optimizer(name, model)

    def train(start, count):
        for step in range(start, start + count):
            optimizer.zero_grad()
            model(batch(step)).backward()
            optimizer.step()

    def whole():
        return {
            "params": [full(p.detach()).clone() for p in model.parameters()],
            "state": [
                {k: full(v).clone() for k, v in optimizer.state[p].items()}
                for p in model.parameters()
            ],
        }

    if args["phase"] == "save":
        train(0, n)
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer),
        }
        dcp.save(state, checkpoint_id=args["dir"])
        saved = whole()
        train(n, more)  # the uninterrupted continuation
        straight = whole()  # gathers: every rank takes part
        if dist.get_rank() == 0:
            torch.save(
                {"saved": saved, "straight": straight},
                os.path.join(args["dir"], "snapshots.pt"),
            )
        report(phase="save")
        return
    # phase == "load": other initial weights, then the checkpoint
    torch.manual_seed(1)
    model2, _ = shard(Net(), "fsdp2", "fp32")
    model, optimizer = model2, make_optimizer(name, model2)
    train(0, 1)  # state exists, and differs from the checkpoint's
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
    }
    dcp.load(state, checkpoint_id=args["dir"])
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    steps_loaded = sorted({int(s["step"]) for s in optimizer.state.values()})
    snapshots = torch.load(os.path.join(args["dir"], "snapshots.pt"), weights_only=True)
    loaded, saved = whole(), snapshots["saved"]
    pairs = list(zip(loaded["params"], saved["params"]))
    for ours, theirs in zip(loaded["state"], saved["state"]):
        pairs += [(ours[k], theirs[k]) for k in theirs]
    loaded_bitwise = all(torch.equal(a, b) for a, b in pairs)
    train(n, more)
    straight = snapshots["straight"]
    param_error = max(
        max_rel_error(full(p.detach()), q)
        for p, q in zip(model.parameters(), straight["params"])
    )
    state_error = 0.0
    for p, saved in zip(model.parameters(), straight["state"]):
        for key, value in saved.items():
            if key != "step":
                state_error = max(
                    state_error, max_rel_error(full(optimizer.state[p][key]), value)
                )
    report(
        phase="load", world=dist.get_world_size(), steps_loaded=steps_loaded,
        loaded_bitwise=loaded_bitwise, optimizer=name,
        param_error=param_error, state_error=state_error,
    )  # fmt: skip


def from_consolidated(args: dict) -> None:
    """Load a consolidated checkpoint that DeepSpeed wrote into FSDP2 (other
    initial weights): bitwise equal on load, then ``more`` steps against
    DeepSpeed's uninterrupted run; write one back for the return trip."""
    from models import StraddleNet, straddle_batch, straddle_groups

    from e_dist.checkpoint import consolidated

    name, n, more = args["optimizer"], args["steps"], args["more"]
    torch.manual_seed(1)
    model = StraddleNet()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in (model.fc1, model.fc2, model.head):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    groups = straddle_groups(model)
    if name == "ALTO":
        optimizer = e_dist.ALTO(groups, max_grad_norm=args["clip"])
    else:
        optimizer = e_dist.E(torch.optim.AdamW(groups), alpha=-5, beta=0.99)
    consolidated.load_into(model, optimizer, args["file"])
    snapshots = torch.load(args["snapshots"], weights_only=True)

    def errors(expected: dict) -> tuple[bool, float, float]:
        bitwise, param_error, state_error = True, 0.0, 0.0
        for pname, p in model.named_parameters():
            ours = {"fp32": full(p.detach())}
            ours.update({k: full(v) for k, v in optimizer.state[p].items()})
            for key, value in expected[pname].items():
                bitwise &= torch.equal(ours[key], value)
                error = max_rel_error(ours[key], value)
                if key == "fp32":
                    param_error = max(param_error, error)
                else:
                    state_error = max(state_error, error)
        return bool(bitwise), param_error, state_error

    loaded_bitwise, _, _ = errors(snapshots["saved"])
    steps_loaded = sorted({int(s["step"]) for s in optimizer.state.values()})
    decays = [g["weight_decay"] for g in optimizer.param_groups]
    for step in range(n, n + more):
        optimizer.zero_grad()
        model(straddle_batch(step)).backward()
        if name != "ALTO":  # DeepSpeed clips before E
            torch.nn.utils.clip_grad_norm_(model.parameters(), args["clip"])
        optimizer.step()
    _, param_error, state_error = errors(snapshots["mid"])
    consolidated.save_from(model, optimizer, args["out"], {"global_steps": n + more})
    report(
        optimizer=name, world=dist.get_world_size(), loaded_bitwise=loaded_bitwise,
        steps_loaded=steps_loaded, weight_decays=decays,
        param_error=param_error, state_error=state_error,
    )  # fmt: skip


SCENARIOS = {
    "parity": parity,
    "collectives": collectives,
    "checkpoint": checkpoint,
    "from_consolidated": from_consolidated,
}


def main() -> None:
    worker_main(SCENARIOS, lambda: dist.init_process_group("gloo"))


if __name__ == "__main__":
    main()
