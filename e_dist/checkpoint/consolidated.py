"""One file with whole parameters and whole optimizer state, by name.

The file moves a run between backends and world sizes: DeepSpeed writes it
offline (:func:`e_dist.checkpoint.zero.read`), one process and FSDP2 write it
with :func:`save_from`; one process and FSDP2 load it with :func:`load_into`,
DeepSpeed through a universal checkpoint made from it
(:func:`e_dist.checkpoint.universal.write`).

Layout (``torch.save`` of a dict of tensors, strings and numbers only, so it
loads with ``weights_only=True``)::

    format     "e_dist.consolidated"
    version    1
    optimizer  {"type": "ALTO"} or {"type": "E", "base": "AdamW"}
    model      {parameter name: fp32 tensor, its full shape}
    optimizer_state
               {"state": {name: {"step": tensor, key: full tensor, ...}},
                "param_groups": [{hyperparameters..., "params": [names]}]}
    meta       {"global_steps": int, "source": str, ...}
    checksum   SHA-256 of every tensor's name, dtype, shape and bytes

``optimizer_state`` is the full optimizer state dict that
``torch.distributed.checkpoint.state_dict`` uses (state keyed by name).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from e_dist.alto import ALTO
from e_dist.checkpoint import io
from e_dist.checkpoint.io import CheckpointError
from e_dist.e import E

FORMAT = "e_dist.consolidated"
VERSION = 1
# Keys of the file.
MODEL = "model"
OPTIMIZER = "optimizer"
OPTIMIZER_STATE = "optimizer_state"
META = "meta"
CHECKSUM = "checksum"


# ---------------------------------------------------------------------------
# Which optimizer


def describe(optimizer: torch.optim.Optimizer) -> dict[str, str]:
    """``{"type": "ALTO"}`` or ``{"type": "E", "base": <torch.optim class>}``."""
    if isinstance(optimizer, ALTO):
        return {"type": "ALTO"}
    if isinstance(optimizer, E):
        return {"type": "E", "base": type(optimizer.base_optimizer).__name__}
    raise TypeError(
        f"e_dist checkpoints hold ALTO or E state, not {type(optimizer).__name__}"
    )


def describe_name(name: str, params: dict[str, Any] | None = None) -> dict[str, str]:
    """The description of a registry name (as in a DeepSpeed config)."""
    from e_dist import registry

    if name == "ALTO":
        return {"type": "ALTO"}
    if name in registry.E_BASES:
        return {"type": "E", "base": registry.E_BASES[name]}
    if name == "E" and params and "base" in params:
        return {"type": "E", "base": str(params["base"])}
    raise CheckpointError(f"optimizer {name!r} is not one of e_dist's")


def label(description: dict[str, str]) -> str:
    if description.get("type") == "E":
        return f"E over {description.get('base')}"
    return str(description.get("type"))


def check_optimizer(found: dict[str, str], expected: dict[str, str], what: str):
    """Raise unless a checkpoint's optimizer is the live one."""
    if dict(found) != dict(expected):
        raise CheckpointError(
            f"{what} holds the state of {label(found)}, but the optimizer it is "
            f"loaded into is {label(expected)}; nothing was loaded"
        )


# ---------------------------------------------------------------------------
# The file


def _tensors(ckpt: dict[str, Any]) -> Iterator[tuple[str, Tensor]]:
    for name in sorted(ckpt[MODEL]):
        yield f"model/{name}", ckpt[MODEL][name]
    state = ckpt[OPTIMIZER_STATE]["state"]
    for name in sorted(state):
        for key in sorted(state[name]):
            value = state[name][key]
            if torch.is_tensor(value):
                yield f"state/{name}/{key}", value


def checksum(ckpt: dict[str, Any]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in _tensors(ckpt):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def make(
    description: dict[str, str],
    model: dict[str, Tensor],
    optimizer_state: dict[str, Any],
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A consolidated checkpoint from its parts (tensors moved to the CPU)."""
    model = {k: v.detach().to("cpu", copy=True) for k, v in model.items()}
    state = {
        name: {
            k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v
            for k, v in entry.items()
        }
        for name, entry in optimizer_state["state"].items()
    }
    groups = [dict(g) for g in optimizer_state["param_groups"]]
    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        OPTIMIZER: dict(description),
        MODEL: model,
        OPTIMIZER_STATE: {"state": state, "param_groups": groups},
        META: dict(meta or {}),
    }
    validate(ckpt, "consolidated checkpoint")
    return ckpt


def validate(ckpt: Any, what: str) -> None:
    """Raise a :class:`CheckpointError` unless ``ckpt`` is well formed."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{what} is not an e_dist consolidated checkpoint")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(
            f"{what} has format version {ckpt.get('version')!r}; this e_dist reads "
            f"version {VERSION}"
        )
    for key in (OPTIMIZER, MODEL, OPTIMIZER_STATE, META):
        if not isinstance(ckpt.get(key), dict):
            raise CheckpointError(f"{what} lacks its {key!r} entry")
    model, osd = ckpt[MODEL], ckpt[OPTIMIZER_STATE]
    named = [n for g in osd.get("param_groups", []) for n in g.get("params", [])]
    missing = sorted(set(named) - set(model))
    if missing:
        raise CheckpointError(
            f"{what}: optimizer groups name unknown parameters {missing}"
        )
    for name, entry in osd.get("state", {}).items():
        for key, value in entry.items():
            if key != "step" and torch.is_tensor(value):
                if value.shape != model[name].shape:
                    raise CheckpointError(
                        f"{what}: state {key!r} of {name} has shape "
                        f"{tuple(value.shape)}, the parameter "
                        f"{tuple(model[name].shape)}"
                    )


def save(ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``ckpt`` to ``path`` atomically, with its checksum."""
    validate(ckpt, str(path))
    io.atomic_save({**ckpt, CHECKSUM: checksum(ckpt)}, path)


def load(path: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """Read a consolidated checkpoint (``weights_only=True``), checking its
    format and, with ``verify``, its checksum."""
    ckpt = io.load(path, "consolidated checkpoint")
    validate(ckpt, f"consolidated checkpoint {path}")
    if verify:
        recorded = ckpt.get(CHECKSUM)
        if recorded != checksum(ckpt):
            raise CheckpointError(
                f"consolidated checkpoint {path} is corrupted: its tensors' "
                "checksum differs from the one written with them"
            )
    return ckpt


# ---------------------------------------------------------------------------
# One process and FSDP2


def _is_distributed(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def save_from(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    path: str | os.PathLike,
    meta: dict[str, Any] | None = None,
) -> None:
    """Write the consolidated checkpoint of a model and its ALTO or E.

    One process, or FSDP2 (every rank calls it; whole tensors are gathered
    onto rank 0's CPU, which writes).
    """
    import torch.distributed as dist

    description = describe(optimizer)
    if _is_distributed(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        if dist.get_rank() == 0:
            save(
                make(description, _parameters_only(model, model_sd), optim_sd, meta),
                path,
            )
        dist.barrier()
        return
    names = {p: n for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    live = [p for g in optimizer.param_groups for p in g["params"]]
    name_of = {i: names[p] for i, p in enumerate(live)}
    state = {name_of[i]: entry for i, entry in sd["state"].items()}
    groups = [
        {**g, "params": [name_of[i] for i in g["params"]]} for g in sd["param_groups"]
    ]
    model_sd = {n: p.detach().float() for n, p in model.named_parameters()}
    osd = {"state": state, "param_groups": groups}
    save(make(description, model_sd, osd, meta), path)


def _parameters_only(model: torch.nn.Module, model_sd: dict[str, Any]) -> dict:
    names = {n for n, _ in model.named_parameters()}
    return {n: v.float() for n, v in model_sd.items() if n in names}


def load_into(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    path: str | os.PathLike,
) -> dict[str, Any]:
    """Load a consolidated checkpoint into a model and its ALTO or E: one
    process, or FSDP2 (every rank calls it). Everything is checked before
    anything is changed; returns the file's ``meta``."""
    ckpt = load(path)
    check_optimizer(ckpt[OPTIMIZER], describe(optimizer), f"checkpoint {path}")
    names = [n for n, _ in model.named_parameters()]
    missing = sorted(set(names) - set(ckpt[MODEL]))
    unexpected = sorted(set(ckpt[MODEL]) - set(names))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model: missing {missing}, "
            f"unexpected {unexpected}; nothing was loaded"
        )
    for name, param in model.named_parameters():
        if tuple(ckpt[MODEL][name].shape) != tuple(param.shape):
            raise CheckpointError(
                f"checkpoint {path}: {name} has shape "
                f"{tuple(ckpt[MODEL][name].shape)}, the model {tuple(param.shape)}; "
                "nothing was loaded"
            )
    osd = ckpt[OPTIMIZER_STATE]
    names = {p: n for n, p in model.named_parameters()}
    live = [[names[p] for p in g["params"]] for g in optimizer.param_groups]
    saved = [list(g["params"]) for g in osd["param_groups"]]
    if [sorted(g) for g in live] != [sorted(g) for g in saved]:
        raise CheckpointError(
            f"checkpoint {path} groups the parameters as {saved}, the optimizer "
            f"as {live}; nothing was loaded"
        )
    if _is_distributed(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_state_dict,
        )

        set_state_dict(
            model,
            optimizer,
            model_state_dict=ckpt[MODEL],
            optim_state_dict=osd,
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
        return ckpt[META]
    # Indices in the live optimizer's order, as load_state_dict pairs them.
    order = [n for group in live for n in group]
    state = {i: osd["state"][n] for i, n in enumerate(order) if n in osd["state"]}
    groups, start = [], 0
    for group, names_in_group in zip(osd["param_groups"], live, strict=True):
        indices = list(range(start, start + len(names_in_group)))
        groups.append({**group, "params": indices})
        start += len(names_in_group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(ckpt[MODEL][name])
    return ckpt[META]
