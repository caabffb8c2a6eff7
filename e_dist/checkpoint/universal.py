"""DeepSpeed universal checkpoints that keep every optimizer state key.

DeepSpeed's converter (``deepspeed.checkpoint.ds_to_universal``) writes
``fp32``, ``exp_avg`` and ``exp_avg_sq`` only, and its ZeRO-3 loader reads
only those three and gives every parameter group the hyperparameters of the
first; a run resumed from it loses ALTO's and E's ``grad_ema`` and its
no-decay group's settings, and silently becomes another algorithm.

:func:`write` makes a universal checkpoint from a consolidated one (read
from any ZeRO checkpoint by :func:`e_dist.checkpoint.zero.read`, or written
by one process or FSDP2) in DeepSpeed's layout::

    <out>/zero/<param name>/fp32.pt        {"param": whole tensor}
    <out>/zero/<param name>/<key>.pt       one per state key, grad_ema included
    <out>/zero/<param name>/step.pt
    <out>/zero/optimizer_state.pt          groups, steps, e_dist's record
    <out>/mp_rank_00_model_states.pt       engine metadata and client state
    <out>/zero_pp_rank_0_mp_rank_00_model_states.pt   (the same, for ZeRO-3)
    <out>/e_dist_complete.json             written last: the checkpoint is whole

and ``latest_universal`` next to it. An engine whose optimizer is ALTO or E
and whose config says ``"checkpoint": {"load_universal": true}`` loads it at
any world size and ZeRO stage 1, 2 or 3 with ``engine.load_checkpoint``:
:func:`install_loaders` (called when e_dist attaches to the engine) replaces
the wrapper's universal loader with :func:`load_zero12` or
:func:`load_zero3`, which restore every key and each group's own
hyperparameters, and check everything before changing anything.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from e_dist.checkpoint import consolidated, io
from e_dist.checkpoint.io import CheckpointError

FORMAT = "e_dist.universal"
VERSION = 1
INFO = "e_dist"  # e_dist's record in zero/optimizer_state.pt
PARAM = "param"  # deepspeed.checkpoint.constants.PARAM
FP32 = "fp32"
STEP = "step"
MODEL_FILES = (
    "mp_rank_00_model_states.pt",  # read by ZeRO-1/2 engines
    "zero_pp_rank_0_mp_rank_00_model_states.pt",  # read by ZeRO-3 engines
)


# ---------------------------------------------------------------------------
# Writing


def write(ckpt: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write consolidated checkpoint ``ckpt`` as a universal checkpoint at
    ``out`` (a new folder); ``latest_universal`` beside it names it.

    The folder is built under a temporary name, marked complete and renamed:
    an interrupted conversion leaves no folder that looks complete.
    """
    import deepspeed

    consolidated.validate(ckpt, "consolidated checkpoint")
    out = Path(out)
    if out.exists():
        raise CheckpointError(f"{out} exists; remove it or choose another folder")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    zero = tmp / "zero"
    state = ckpt[consolidated.OPTIMIZER_STATE]["state"]
    groups = ckpt[consolidated.OPTIMIZER_STATE]["param_groups"]
    keys = sorted({k for entry in state.values() for k in entry if k != STEP})
    for name, tensor in ckpt[consolidated.MODEL].items():
        folder = zero / name
        folder.mkdir(parents=True)
        torch.save({PARAM: tensor}, folder / f"{FP32}.pt")
        entry = state.get(name, {})
        for key in keys:
            value = entry.get(key)
            if value is None:
                raise CheckpointError(
                    f"parameter {name} has no optimizer state {key!r}"
                )
            torch.save({PARAM: value}, folder / f"{key}.pt")
        if STEP in entry:
            torch.save(entry[STEP], folder / f"{STEP}.pt")
    steps = [_group_step(state, group) for group in groups]
    info = {
        "format": FORMAT,
        "version": VERSION,
        "optimizer": ckpt[consolidated.OPTIMIZER],
        "state_keys": keys,
        "steps": steps,
        "source": ckpt[consolidated.META].get("source", ""),
    }
    plain = [{k: v for k, v in g.items()} for g in groups]
    global_state = {
        INFO: info,
        "param_groups": plain,
        # What DeepSpeed's own loaders read, for tools that look.
        "optimizer_state_dict": {"state": {0: {STEP: steps[0]}}, "param_groups": plain},
        "ds_version": deepspeed.__version__,
    }
    torch.save(global_state, zero / "optimizer_state.pt")
    meta = ckpt[consolidated.META]
    model_states = {
        **meta.get("client_state", {}),
        "module": dict(ckpt[consolidated.MODEL]),
        "buffer_names": [],
        "optimizer": None,
        "lr_scheduler": meta.get("lr_scheduler"),
        "data_sampler": None,
        "random_ltd": None,
        "skipped_steps": int(meta.get("skipped_steps", 0)),
        "global_steps": int(meta.get("global_steps", 0)),
        "global_samples": int(meta.get("global_samples", 0)),
        "dp_world_size": 1,
        "mp_world_size": 1,
        "ds_version": deepspeed.__version__,
    }
    for name in MODEL_FILES:
        torch.save(model_states, tmp / name)
    io.commit(tmp, {"kind": FORMAT})
    os.replace(tmp, out)
    io.write_latest(out.parent, out.name, "latest_universal")
    return out


def _group_step(state: dict[str, Any], group: dict[str, Any]) -> Tensor | None:
    steps = [state[n][STEP] for n in group["params"] if STEP in state.get(n, {})]
    for step in steps[1:]:
        if not torch.equal(torch.as_tensor(step), torch.as_tensor(steps[0])):
            raise CheckpointError(
                f"parameters of one group have different step counts: "
                f"{float(steps[0])} and {float(step)}"
            )
    return torch.as_tensor(steps[0], dtype=torch.float32).clone() if steps else None


# ---------------------------------------------------------------------------
# Loading into ZeRO


def read_global_state(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """``zero/optimizer_state.pt`` of a universal checkpoint written by
    :func:`write`, after checking that the folder is complete."""
    folder = Path(checkpoint_dir)
    io.verify(folder, checksums=False)
    path = folder / "zero" / "optimizer_state.pt"
    global_state = io.load(path, "universal checkpoint state")
    if INFO not in global_state:
        raise CheckpointError(
            f"{folder} was not written by e_dist: DeepSpeed's ds_to_universal "
            "drops ALTO's and E's grad_ema. Convert the ZeRO checkpoint with "
            "`python -m e_dist.checkpoint universal <tag folder> <output folder>`"
        )
    info = global_state[INFO]
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise CheckpointError(f"{path} has an unknown format {info.get('format')!r}")
    return global_state


def _check(wrapper: Any, global_state: dict[str, Any], folder: str) -> list[str]:
    info = global_state[INFO]
    consolidated.check_optimizer(
        info["optimizer"], consolidated.describe(wrapper.optimizer), folder
    )
    saved = global_state["param_groups"]
    live = wrapper.optimizer.param_groups
    if len(saved) != len(live):
        raise CheckpointError(
            f"{folder} has {len(saved)} parameter groups, the optimizer {len(live)}; "
            "nothing was loaded"
        )
    return list(info["state_keys"])


def _read_full(folder: Path, name: str, key: str, numel: int) -> Tensor:
    path = folder / "zero" / name / f"{key}.pt"
    value = io.load(path, "universal checkpoint file")
    tensor = value[PARAM] if isinstance(value, dict) else value
    if tensor.numel() != numel:
        raise CheckpointError(
            f"{path} holds {tensor.numel()} elements, the parameter {numel}; "
            "nothing was loaded"
        )
    return tensor.reshape(-1).float()


def _set_hyperparameters(live: list[dict], saved: list[dict]) -> None:
    for group, source in zip(live, saved, strict=True):
        for key, value in source.items():
            if key != "params":
                group[key] = value


def load_zero12(wrapper: Any, lp_groups_name: str, checkpoint_dir: str) -> None:
    """Universal checkpoint into ZeRO-1/2 or BF16_Optimizer: every state key,
    each group's step and hyperparameters."""
    folder = Path(checkpoint_dir)
    global_state = read_global_state(folder)
    keys = _check(wrapper, global_state, str(folder))
    steps = global_state[INFO]["steps"]
    lp_groups = getattr(wrapper, lp_groups_name)
    if hasattr(wrapper, "single_partition_of_fp32_groups"):
        flats = wrapper.single_partition_of_fp32_groups
    else:
        flats = wrapper.fp32_groups_flat_partition
    # Read and check everything first.
    pieces = []
    for lp_group in lp_groups:
        group_pieces = []
        for lp in lp_group:
            mapping = lp._hp_mapping
            if mapping is None:
                continue
            name = wrapper.param_names[lp]
            lp_address = mapping.lp_fragment_address
            tensors = {
                key: _read_full(folder, name, key, lp.numel()).narrow(
                    0, lp_address.start, lp_address.numel
                )
                for key in (FP32, *keys)
            }
            group_pieces.append((mapping, tensors))
        pieces.append(group_pieces)
    wrapper._load_global_state(global_state)
    basic = wrapper.optimizer
    for i, flat in enumerate(flats):
        state = {key: torch.zeros_like(flat) for key in keys}
        for mapping, tensors in pieces[i]:
            address = mapping.hp_fragment_address
            flat.data.narrow(0, address.start, address.numel).copy_(tensors[FP32])
            for key in keys:
                state[key].narrow(0, address.start, address.numel).copy_(tensors[key])
            mapping.optim_fragment = {
                key: state[key].narrow(0, address.start, address.numel) for key in keys
            }
        if steps[i] is not None:
            state[STEP] = steps[i].clone()
        basic.state[flat] = state
    _set_hyperparameters(basic.param_groups, global_state["param_groups"])


def load_zero3(wrapper: Any, checkpoint_dir: str) -> None:
    """Universal checkpoint into ZeRO-3: every state key, each group's step
    and hyperparameters (DeepSpeed's own loader gives every group the
    first's)."""
    if getattr(wrapper, "swap_optimizer", False):
        raise CheckpointError(
            "e_dist cannot load a universal checkpoint with NVMe optimizer offload"
        )
    folder = Path(checkpoint_dir)
    global_state = read_global_state(folder)
    keys = _check(wrapper, global_state, str(folder))
    steps = global_state[INFO]["steps"]
    flats = wrapper.fp32_partitioned_groups_flat
    # Read and check everything first.
    partitions = []
    for sg, params in enumerate(wrapper.fp16_groups):
        rank = dist.get_rank(group=wrapper.sub_group_process_groups[sg])
        per_key = {key: [] for key in (FP32, *keys)}
        for param in params:
            name = wrapper.param_names[param]
            size = param.partition_numel()
            start = min(rank * size, param.ds_numel)
            length = max(0, min(size, param.ds_numel - rank * size))
            for key in per_key:
                full = _read_full(folder, name, key, param.ds_numel)
                piece = torch.zeros(size, dtype=torch.float32)
                piece[:length] = full[start : start + length]
                per_key[key].append(piece)
        partitions.append({k: torch.cat(v) if v else None for k, v in per_key.items()})
        if flats[sg].numel() != sum(p.partition_numel() for p in params):
            raise CheckpointError(
                "ZeRO-3 partition sizes do not add up; nothing loaded"
            )
    wrapper._load_global_state_stage3(global_state)
    basic = wrapper.optimizer
    for sg, flat in enumerate(flats):
        loaded = partitions[sg]
        if loaded[FP32] is not None:
            flat.data.copy_(loaded[FP32].to(flat.device))
        state = {
            key: (loaded[key] if loaded[key] is not None else torch.zeros(0)).to(
                flat.device
            )
            for key in keys
        }
        step = steps[wrapper.sub_group_to_group_id[sg]]
        if step is not None:
            state[STEP] = step.clone()
        basic.state[flat] = state
    _set_hyperparameters(basic.param_groups, global_state["param_groups"])
    for group in basic.param_groups:
        group["params"] = []  # ZeRO-3 puts one sub-group in at each step
    # The low-precision partitions and the module's views follow the fp32.
    for sg, flat in enumerate(flats):
        if flat.numel() > 0:
            wrapper.fp16_partitioned_groups_flat[sg].data.copy_(flat.data)
    for sg, flat16 in enumerate(wrapper.fp16_partitioned_groups_flat):
        params = wrapper.fp16_partitioned_groups[sg]
        for param, data in zip(params, wrapper.unflatten(flat16, params), strict=True):
            param.data = data.data


def check_engine_load(engine: Any, load_dir: str, tag: str | None) -> None:
    """Before ``engine.load_checkpoint`` of a universal checkpoint changes
    anything (DeepSpeed sets its step counters before the optimizer loads):
    the folder is complete and holds this optimizer's state."""
    if tag is None:
        tag = io.read_latest(load_dir, "latest_universal")
        if tag is None:
            return  # DeepSpeed itself warns and loads nothing
    folder = Path(load_dir) / str(tag)
    _check(engine.optimizer, read_global_state(folder), str(folder))


def install_loaders(wrapper: Any) -> None:
    """Make ``wrapper`` load universal checkpoints with every state key."""
    kind = type(wrapper).__name__
    if kind in ("DeepSpeedZeroOptimizer", "BF16_Optimizer"):
        wrapper.load_hp_checkpoint_state_from_checkpoint_dir = functools.partial(
            load_zero12, wrapper
        )
    elif kind == "DeepSpeedZeroOptimizer_Stage3":
        wrapper.load_hp_checkpoint_state_from_checkpoint_dir_stage3 = functools.partial(
            load_zero3, wrapper
        )
