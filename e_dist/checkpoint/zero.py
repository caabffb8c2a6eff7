"""Read a DeepSpeed ZeRO-1/2/3 checkpoint into whole tensors, every
optimizer state key included.

DeepSpeed's own tools keep only ``exp_avg`` and ``exp_avg_sq``
(``ds_to_universal``) or no optimizer state at all (``zero_to_fp32``); ALTO
and E also hold ``grad_ema`` (and E over SGD holds ``momentum_buffer``), so
this reader takes every tensor key it finds in the flat partitions.

Where each parameter's pieces lie:

- ZeRO-1/2 (and BF16_Optimizer): one flat fp32 partition per group per
  rank; ``param_slice_mappings`` names each piece's start and length in it.
  A parameter is its pieces in rank order.
- ZeRO-3: one flat fp32 tensor per sub-group per rank, the concatenation of
  each parameter's partition: ``ceil(numel / world)`` elements, the last
  ranks' zero-padded.

Data parallelism only: checkpoints of tensor or pipeline parallel runs are
refused (DeepSpeed's converter handles those, without ``grad_ema``).
Memory: the whole fp32 state of the model is held on the host.

:func:`check_engine_load` looks at the same files from the other side:
before a live engine loads a checkpoint of DeepSpeed's own format, that it
can load it whole.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from e_dist.checkpoint import consolidated, io
from e_dist.checkpoint.io import CheckpointError

logger = logging.getLogger(__name__)

_OPTIM = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
# Model-state entries of DeepSpeed's own, not the caller's client state.
_ENGINE_KEYS = {
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes",
    "shared_params", "frozen_param_fragments", "lr_scheduler", "data_sampler",
    "random_ltd", "sparse_tensor_module_names", "skipped_steps", "global_steps",
    "global_samples", "dp_world_size", "mp_world_size", "ds_config", "ds_version",
    "checkpoint_parallel_dimensions", "universal_checkpoint_info",
}  # fmt: skip


def _safe_globals() -> list[Any]:
    """DeepSpeed's classes that its checkpoint files pickle, allowed through
    ``weights_only=True``."""
    found: list[Any] = [(_enum_member, "builtins.getattr")]
    for module, names in (
        ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
        ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
        ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
    ):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return found


def _enum_member(cls: Any, name: str) -> enum.Enum:
    """What a pickle's ``getattr(cls, name)`` may fetch: an enum member.

    Some Python versions (3.11.2, Debian 12's) pickle enum members, such as
    DeepSpeed's ``ZeroStageEnum``, as ``getattr(cls, name)``; ``getattr``
    itself cannot be allowed, it would reach any attribute.
    """
    if isinstance(cls, type) and issubclass(cls, enum.Enum):
        member = cls.__members__.get(name)
        if member is not None:
            return member
    raise pickle.UnpicklingError(
        f"getattr({cls!r}, {name!r}) in a checkpoint is not an enum member"
    )


def load_file(path: Path, trust: bool = False, mmap: bool = False) -> Any:
    """A DeepSpeed checkpoint file; ``weights_only=True`` with DeepSpeed's own
    classes allowed, or a full unpickling where ``trust`` says so. ``mmap``
    maps tensors instead of reading them (see :func:`io.load`)."""
    if trust:
        if not path.is_file():
            raise CheckpointError(f"DeepSpeed checkpoint file {path} does not exist")
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        except Exception as err:  # any failure: reported with the file's name
            raise CheckpointError(io._corrupted(path, "checkpoint file", err)) from err
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return io.load(path, "DeepSpeed checkpoint file", mmap=mmap)
        except CheckpointError as err:
            if "weights_only" in str(err):
                raise CheckpointError(
                    f"{err}\nIf you trust this checkpoint (e.g. its client state "
                    "holds your own classes), pass --trust-pickles"
                ) from None
            raise


def _rank_files(directory: Path) -> list[Path]:
    files = {}
    for path in directory.iterdir():
        match = _OPTIM.match(path.name)
        if match:
            if int(match.group(3)) != 0:
                raise CheckpointError(
                    f"{directory} is a tensor-parallel checkpoint (found {path.name}); "
                    "e_dist reads data-parallel ZeRO checkpoints only"
                )
            files[int(match.group(2))] = path
    if not files:
        raise CheckpointError(
            f"{directory} holds no ZeRO optimizer files (*_optim_states.pt); pass a "
            "checkpoint's tag folder, e.g. checkpoints/global_step100"
        )
    if sorted(files) != list(range(len(files))):
        raise CheckpointError(
            f"{directory} lacks the optimizer files of ranks "
            f"{sorted(set(range(max(files) + 1)) - set(files))}"
        )
    return [files[r] for r in range(len(files))]


def _model_file(directory: Path) -> Path:
    for name in (
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
    ):
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"{directory} holds no model-states file (mp_rank_00_*)")


def _describe(model_states: dict[str, Any], groups: list[dict], keys: set[str]):
    """The optimizer, from the config's type or, failing that, the state."""
    spec = (model_states.get("ds_config") or {}).get("optimizer") or {}
    if "type" in spec:
        return consolidated.describe_name(spec["type"], spec.get("params"))
    if groups and "adaptation" in groups[0] and len(groups[0].get("betas", ())) == 3:
        return {"type": "ALTO"}
    raise CheckpointError(
        "the checkpoint's config names no optimizer type and its state "
        f"(keys {sorted(keys)}) is not ALTO's; pass --optimizer"
    )


def read(
    directory: str | os.PathLike,
    trust: bool = False,
    optimizer: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The consolidated checkpoint of a ZeRO checkpoint's tag folder."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder {directory} does not exist")
    rank_files = _rank_files(directory)
    model_states = load_file(_model_file(directory), trust)
    dims = model_states.get("checkpoint_parallel_dimensions") or {}
    if dims.get("tp_degree", 1) != 1 or dims.get("pp_degree", 1) != 1:
        raise CheckpointError(
            f"{directory} was written with tensor/pipeline parallelism {dims}; "
            "e_dist reads data-parallel ZeRO checkpoints only"
        )
    ranks = [load_file(f, trust)["optimizer_state_dict"] for f in rank_files]
    stage = int(ranks[0].get("zero_stage", 1))
    shapes = [dict(s) for s in model_states["param_shapes"]]
    if stage == 3:
        pieces, steps, groups = _zero3(ranks, shapes)
    else:
        pieces, steps, groups = _zero12(ranks, shapes)
    model, state = {}, {}
    for name, by_key in pieces.items():
        shape = next(s[name] for s in shapes if name in s)
        for key, parts in by_key.items():
            full = torch.cat(parts) if parts else torch.zeros(0)
            if full.numel() != math.prod(shape):
                raise CheckpointError(
                    f"{directory}: the pieces of {key} of {name} hold {full.numel()} "
                    f"elements, its shape {tuple(shape)} needs {math.prod(shape)}"
                )
            full = full.reshape(shape)
            if key == "fp32":
                model[name] = full
            else:
                state.setdefault(name, {})[key] = full
    for group, step in zip(groups, steps, strict=True):
        for name in group["params"]:
            if step is not None:
                state.setdefault(name, {})["step"] = step.clone()
    keys = {k for entry in state.values() for k in entry}
    description = optimizer or _describe(model_states, groups, keys)
    meta = {
        "source": f"deepspeed zero-{stage}, {len(ranks)} ranks, {directory.name}",
        "global_steps": int(model_states.get("global_steps", 0)),
        "global_samples": int(model_states.get("global_samples", 0)),
        "skipped_steps": int(model_states.get("skipped_steps", 0)),
        "client_state": {
            k: v for k, v in model_states.items() if k not in _ENGINE_KEYS
        },
    }
    osd = {"state": state, "param_groups": groups}
    return consolidated.make(description, model, osd, meta)


def _flat_keys(entry: dict[str, Any]) -> list[str]:
    keys = []
    for key, value in entry.items():
        if key == "step":
            continue
        if not torch.is_tensor(value) or value.dim() != 1:
            raise CheckpointError(
                f"optimizer state {key!r} is not a flat tensor "
                f"({type(value).__name__}); e_dist cannot split it by parameter"
            )
        keys.append(key)
    return keys


def _zero12(ranks: list[dict], shapes: list[dict]):
    """Pieces of ZeRO-1/2 partitions: in each rank's flat partition of group
    ``g``, ``param_slice_mappings[g][name]`` is (numel, start)."""
    pieces: dict[str, dict[str, list]] = {}
    steps: list[Any] = [None] * len(shapes)
    for sd in ranks:
        base = sd["base_optimizer_state"]
        for g, mapping in enumerate(sd["param_slice_mappings"]):
            flat = {"fp32": sd["single_partition_of_fp32_groups"][g]}
            entry = base["state"].get(g, {})
            flat.update({k: entry[k] for k in _flat_keys(entry)})
            steps[g] = _same_step(steps[g], entry.get("step"), g)
            for name, address in mapping.items():
                start, numel = int(address.start), int(address.numel)
                for key, tensor in flat.items():
                    parts = pieces.setdefault(name, {}).setdefault(key, [])
                    parts.append(tensor.narrow(0, start, numel))
    groups = []
    for g, group in enumerate(ranks[0]["base_optimizer_state"]["param_groups"]):
        groups.append({**group, "params": list(shapes[g])})
    return pieces, steps, groups


def _zero3(ranks: list[dict], shapes: list[dict]):
    """Pieces of ZeRO-3 sub-groups: each parameter's partition of
    ``ceil(numel / world)`` elements, in order, in the sub-group's flat."""
    world = len(ranks)
    inner_groups = ranks[0]["optimizer_state_dict"]["param_groups"]
    group_of = {sg: g for g, group in enumerate(inner_groups) for sg in group["params"]}
    pieces: dict[str, dict[str, list]] = {}
    steps: list[Any] = [None] * len(inner_groups)
    for rank, sd in enumerate(ranks):
        inner = sd["optimizer_state_dict"]
        for sg, names in enumerate(shapes):
            flat = {"fp32": sd["fp32_flat_groups"][sg]}
            entry = inner["state"].get(sg, {})
            flat.update({k: entry[k] for k in _flat_keys(entry)})
            steps[group_of[sg]] = _same_step(steps[group_of[sg]], entry.get("step"), sg)
            offset = 0
            for name, shape in names.items():
                numel = math.prod(shape)
                size = math.ceil(numel / world)
                length = max(0, min(size, numel - rank * size))
                for key, tensor in flat.items():
                    parts = pieces.setdefault(name, {}).setdefault(key, [])
                    parts.append(tensor.narrow(0, offset, length))
                offset += size
    groups = []
    for group in inner_groups:
        names = [n for sg in group["params"] for n in shapes[sg]]
        groups.append({**group, "params": names})
    return pieces, steps, groups


def _same_step(seen: Any, step: Any, where: int) -> Any:
    if step is None:
        return seen
    step = torch.as_tensor(step, dtype=torch.float32)
    if seen is not None and not torch.equal(seen, step):
        raise CheckpointError(
            f"ranks disagree on the step count of group {where}: "
            f"{float(seen)} and {float(step)}"
        )
    return step


# ---------------------------------------------------------------------------
# Before a live engine loads a checkpoint of its own format


def check_engine_load(
    engine: Any, load_dir: str, tag: str | None, load_optimizer_states: bool = True
) -> None:
    """Before ``engine.load_checkpoint`` of a ZeRO or stage-0 checkpoint
    changes anything.

    DeepSpeed loads the module's weights and its step counters before the
    optimizer's state: a file that fails to open, a checkpoint saved at
    another data-parallel world size or ZeRO stage, or one of another
    optimizer would leave the live run half loaded. Each rank opens the files
    it is going to read (memory-mapped: only their structure is read) and
    checks them; the ranks then agree, so that where one rank finds a
    problem, every rank raises it and none starts loading.
    """
    import torch.distributed as dist

    kind = type(getattr(engine, "checkpoint_engine", None)).__name__
    if kind != "TorchCheckpointEngine":
        _warn_unchecked(kind)
        return
    if tag is None:
        tag = io.read_latest(load_dir)
        if tag is None:
            return  # DeepSpeed itself warns and loads nothing
    error = None
    try:
        _check_own_files(engine, load_dir, str(tag), load_optimizer_states)
    except CheckpointError as err:
        error = str(err)
    except Exception as err:  # a file of unexpected layout: said, not hung on
        error = f"{Path(load_dir) / str(tag)}: {type(err).__name__}: {err}"
    errors: list[str | None] = [error]
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    if error is not None:
        raise CheckpointError(f"{error}; nothing was loaded")
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if failed:
        rank, message = failed[0]
        raise CheckpointError(
            f"rank {rank} refused the checkpoint: {message}; nothing was loaded"
        )


@functools.cache
def _warn_unchecked(kind: str) -> None:
    logger.warning(
        "e_dist checks DeepSpeed checkpoints before loading only when they are "
        "written by torch.save (TorchCheckpointEngine); this engine uses %s, "
        "whose checkpoints load unchecked",
        kind,
    )


def _check_own_files(
    engine: Any, load_dir: str, tag: str, load_optimizer_states: bool
) -> None:
    from e_dist.checkpoint.reference import check_loadable

    folder = Path(load_dir) / tag
    model_file = Path(engine._get_ckpt_name(load_dir, tag))
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not model_file.is_file():
        saved = sorted(p.name for p in folder.glob("*model_states.pt"))
        raise CheckpointError(
            f"{folder} has no {model_file.name}, which this engine (ZeRO stage "
            f"{engine.zero_optimization_stage()}) reads; it holds {saved or 'none'}. "
            + _CONVERT.format(folder=folder)
        )
    # DeepSpeed's own load, next, unpickles these files whole (weights_only
    # False): the check trusts them as far, so that it refuses no checkpoint
    # that DeepSpeed would load, such as one whose client state holds the
    # caller's classes.
    model_states = load_file(model_file, trust=True, mmap=True)
    if not load_optimizer_states or engine.zero_nvme_offload_optimizer():
        return  # NVMe-offloaded state is copied from its own folder
    if engine.zero_optimization():
        saved_world = model_states.get("dp_world_size")
        live_world = engine.seq_dp_world_size
        if saved_world is not None and int(saved_world) != live_world:
            raise CheckpointError(
                f"{folder} was saved at {saved_world} data-parallel ranks and this "
                f"engine has {live_world}; DeepSpeed loads ZeRO optimizer state "
                "only at the world size it was saved at. "
                + _CONVERT.format(folder=folder)
            )
        zero_sd = load_file(
            _own_optimizer_file(engine, load_dir, tag), trust=True, mmap=True
        )
        zero_sd = zero_sd["optimizer_state_dict"]
        saved_stage = int(zero_sd.get("zero_stage", 1))
        live_stage = engine.zero_optimization_stage()
        if (saved_stage == 3) != (live_stage == 3):
            raise CheckpointError(
                f"{folder} holds ZeRO-{saved_stage} optimizer state and this engine "
                f"runs ZeRO-{live_stage}. " + _CONVERT.format(folder=folder)
            )
        if saved_stage == 3:
            state_dict = zero_sd["optimizer_state_dict"]
        else:
            state_dict = zero_sd["base_optimizer_state"]
        if engine.zero_elastic_checkpoint() and isinstance(state_dict, list):
            # The elastic layout keeps per-group state without hyperparameters.
            return
    else:
        state_dict = model_states.get("optimizer")
        if state_dict is None:
            zero_files = sorted(p.name for p in folder.glob("*optim_states.pt"))
            found = ""
            if zero_files:
                found = f" (a ZeRO checkpoint: {', '.join(zero_files)})"
            raise CheckpointError(
                f"{model_file} holds no optimizer state, which a ZeRO stage 0 engine "
                f"reads from it{found}; load it at ZeRO stage 1, 2 or 3, or pass "
                "load_optimizer_states=False to load the weights alone"
            )
        if engine.optimizer is not engine.basic_optimizer:
            state_dict = state_dict["optimizer_state_dict"]  # stage-0 wrapper's
    check_loadable(
        engine.basic_optimizer, state_dict, caller=f"engine.load_checkpoint({folder})"
    )


_CONVERT = (
    "Convert it with `python -m e_dist.checkpoint universal {folder} OUT` and load "
    'OUT with "checkpoint": {{"load_universal": true}} in the config'
)


def _own_optimizer_file(engine: Any, load_dir: str, tag: str) -> Path:
    """This rank's ``*_optim_states.pt``, as DeepSpeed finds it (either
    bit16 naming, the engine's first)."""
    import torch.distributed as dist

    rank = dist.get_rank(group=engine.optimizer.dp_process_group)
    names = []
    for bf16_mode in (engine.bfloat16_enabled(), not engine.bfloat16_enabled()):
        path = Path(
            engine._get_rank_zero_ckpt_name(
                load_dir, tag, engine.checkpoint_mp_rank, rank, bf16_mode
            )
        )
        if path.is_file():
            return path
        names.append(path.name)
    raise CheckpointError(
        f"checkpoint {Path(load_dir) / tag} lacks the optimizer file of rank {rank} "
        f"({' or '.join(dict.fromkeys(names))})"
    )
