"""Piece maps for parameters that FSDP shards, found from the parameters alone.

- FSDP2 (``fully_shard``), HSDP and FSDP2 with tensor parallelism: every
  parameter is a DTensor. Its local shard is one piece; the pieces of one
  parameter are summed over the process group of every mesh dimension on
  which it is sharded (``Shard``), never over a replicated one (HSDP's
  replicas hold the same piece: summing them would count it twice).
  Parameters with the same sharding form one table, so each step takes one
  all-reduce per such group.
- FSDP1 with ``use_orig_params=True``: the optimizer sees 1-D views into each
  flat parameter's local shard (empty where this rank holds none of a
  parameter, and then without a gradient). The flat parameter's
  ``_shard_param_infos`` place them; its process group sums them. Because
  empty views have no gradient, every rank reaches every collective each step
  whatever it holds.

``ALTO(model.parameters())`` after ``fully_shard`` (or FSDP1 wrapping) calls
:func:`auto_piece_map` and needs nothing else.
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from e_dist.pieces import SINGLE_PROCESS, Piece, PieceMap, ShardedPieceMap
from e_dist.update import _DTENSOR

logger = logging.getLogger(__name__)


def _reduction(param: Any) -> tuple:
    """The process groups over which a DTensor's pieces add up: those of every
    mesh dimension that splits it (``Shard``, and FSDP's ``_StridedShard`` over
    tensor parallelism), never a replicated one."""
    mesh = param.device_mesh
    for i, placement in enumerate(param.placements):
        if placement.is_partial():
            raise ValueError(
                f"a parameter with a Partial placement on mesh dimension {i} has no "
                "well-defined norm; redistribute it to Shard or Replicate first"
            )
    dims = [i for i, p in enumerate(param.placements) if not p.is_replicate()]
    return tuple(mesh.get_group(i) for i in dims)


def dtensor_piece_map(params: Sequence[Tensor]) -> ShardedPieceMap:
    """The map of DTensor parameters (FSDP2, HSDP, tensor parallelism).

    Every process lists the same parameters in the same order, so parameter
    ``j`` of each reduction's table is the same parameter everywhere.
    """
    by_reduction: dict[tuple, list[Tensor]] = {}
    for param in params:
        if not isinstance(param, _DTENSOR):
            raise ValueError(
                "some parameters are DTensors and others are not; e_dist's ALTO "
                "needs all of an optimizer's parameters sharded the same way (put "
                f"plain tensors in another optimizer): got {type(param).__name__} "
                f"of shape {tuple(param.shape)}"
            )
        by_reduction.setdefault(_reduction(param), []).append(param)
    pieces = ShardedPieceMap()
    for groups, members in by_reduction.items():
        table = pieces.add_table(len(members), groups)
        for j, param in enumerate(members):
            pieces.add(param, [Piece(j, 0, param.to_local().numel())], table)
    return pieces


def _handles_holding(params: Sequence[Tensor]) -> list[Any]:
    """FSDP1's flat-parameter handles whose original parameters include
    ``params``. FSDP1 keeps no registry, so the live handles are looked up."""
    flat_module = sys.modules.get("torch.distributed.fsdp._flat_param")
    # FSDP1 marks the parameters it flattens; only then is a search worth it.
    if flat_module is None or not any(
        getattr(p, "_fsdp_flattened", False) for p in params
    ):
        return []
    handle_type = flat_module.FlatParamHandle
    wanted = {id(p) for p in params}
    return [
        obj
        for obj in gc.get_objects()
        if type(obj) is handle_type
        and any(id(p) in wanted for p in (obj.flat_param._params or []))
    ]


def fsdp1_piece_map(
    params: Sequence[Tensor], handles: Sequence[Any]
) -> ShardedPieceMap:
    """The map of FSDP1's original-parameter views (``use_orig_params=True``)."""
    pieces = ShardedPieceMap(reduces_every_step=True)
    known = set()
    for handle in handles:
        flat = handle.flat_param
        table = pieces.add_table(len(flat._params), (handle.process_group,))
        infos = flat._shard_param_infos
        for j, (param, info) in enumerate(zip(flat._params, infos, strict=True)):
            length = info.numel_in_shard if info.in_shard else 0
            pieces.add(param, [Piece(j, 0, length)], table)
            known.add(id(param))
    missing = [p for p in params if id(p) not in known]
    if missing:
        raise ValueError(
            f"{len(missing)} of the optimizer's parameters are not in an FSDP "
            "flat parameter while the others are; e_dist's ALTO needs all of an "
            "optimizer's parameters sharded the same way"
        )
    return pieces


def auto_piece_map(params: Sequence[Tensor]) -> PieceMap:
    """The piece map that the parameters' own sharding implies."""
    if any(isinstance(p, _DTENSOR) for p in params):
        return dtensor_piece_map(params)
    handles = _handles_holding(params)
    if handles:
        return fsdp1_piece_map(params, handles)
    return SINGLE_PROCESS
