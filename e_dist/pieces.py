"""Where the pieces of each parameter live, and how their norms add up.

Words used across the package:

- parameter: the model's whole tensor, as the user defined it.
- piece: the part of one parameter that one process holds (may be empty).
- local tensor: whatever tensor this process's optimizer steps on (the
  optimizer's own "param"); a flat partition of a sharding framework holds
  many pieces, a DTensor's local shard one.
- segment: a piece as seen inside its local tensor, a ``[start, end)`` range
  of the flattened local tensor.

The optimizers ask a piece map three things, naming local tensors by the
objects in their ``param_groups``: the segment offsets of each local tensor;
the full ``[sum theta^2, sum r^2]`` of every segment's parameter, given the
local sums of all segments; and the global sum of squared gradients, given
the local sums. The map of one process holding whole parameters answers with
one segment per tensor and the sums as they are; a sharded map answers with
one all-reduce per process group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from e_dist import update

# A reduction: the process groups over which pieces of one parameter are
# summed, in turn (several for a parameter sharded on several mesh
# dimensions; none for one that every process holds whole).
Groups = tuple[Any, ...]


def _all_reduce(buffers: dict[Groups, Tensor]) -> None:
    """Sum each buffer over each of its groups, in place, with one all-reduce
    per distinct process group: the buffers that a group sums travel together.

    Every process holds the same keys in the same order, so the collectives
    line up; sums over several groups commute, so their order is free.
    """
    order: list[Any] = []
    for groups in buffers:
        order += [g for g in groups if all(g is not h for h in order)]
    for group in order:
        members = [
            b for groups, b in buffers.items() if any(g is group for g in groups)
        ]
        if len(members) == 1:
            dist.all_reduce(members[0], group=group)
            continue
        flat = torch.cat([m.reshape(-1) for m in members])
        dist.all_reduce(flat, group=group)
        for member, part in zip(
            members, flat.split([m.numel() for m in members]), strict=True
        ):
            member.copy_(part.view_as(member))


class PieceMap:
    """The piece map of one process that holds every parameter whole."""

    #: Whether every step() must reach every collective, even on a process
    #: that holds no gradient (FSDP1 leaves empty pieces without one).
    reduces_every_step = False

    def offsets(self, param: Tensor) -> list[int]:
        """Segment boundaries of a local tensor: here, one segment."""
        return [0, update.local(param).numel()]

    def full_sums(self, params: Sequence[Tensor], sums: Tensor) -> Tensor:
        """Whole-parameter ``[sum theta^2, sum r^2]`` for every segment.

        ``sums`` has one row per segment of ``params``, in order; the result
        has the same shape, each row holding the sums over its parameter.
        """
        return sums

    def global_sq_sum(self, params: Sequence[Tensor], sq_sums: Tensor) -> Tensor:
        """The sum of squared gradients over every process, from one local sum
        per segment of ``params``."""
        return sq_sums.sum()


SINGLE_PROCESS = PieceMap()


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, start + length)`` of a local tensor belong to
    parameter ``param`` (an index into its table's parameter list)."""

    param: int
    start: int
    length: int


@dataclass
class _Layout:
    offsets: list[int]  # segment boundaries, padding segments included
    slots: Tensor  # parameter index of each segment in its table, -1 for padding
    table: int


@dataclass
class _Table:
    num_params: int
    groups: Groups


class ShardedPieceMap(PieceMap):
    """Local tensors that hold pieces of parameters, summed over process groups.

    A sharding backend registers each local tensor once with :meth:`add`: the
    pieces it holds, and the parameter list (a *table*: one DeepSpeed group,
    one ZeRO-3 sub-group, all parameters with one DTensor sharding) whose
    indices the pieces use. Every process registers the same tables with the
    same parameter counts and groups, and steps the same tables in the same
    order, so that each step() takes one all-reduce of a ``[2, parameters]``
    buffer per reduction, whatever each process holds.
    """

    def __init__(self, reduces_every_step: bool = False) -> None:
        self._layouts: dict[int, _Layout] = {}
        self._tables: list[_Table] = []
        self.reduces_every_step = reduces_every_step

    def add_table(self, num_params: int, groups: Groups) -> int:
        """Declare a parameter list summed over ``groups``; returns its id."""
        self._tables.append(_Table(num_params, tuple(groups)))
        return len(self._tables) - 1

    def add(self, param: Tensor, pieces: Sequence[Piece], table: int) -> None:
        """Register the pieces of local tensor ``param``; the rest is padding."""
        local = update.local(param)
        numel = local.numel()
        offsets, slots, position = [0], [], 0
        for piece in sorted(pieces, key=lambda p: p.start):
            if piece.start < position or piece.start + piece.length > numel:
                raise ValueError(
                    f"pieces overlap or leave the local tensor of {numel} elements: "
                    f"{piece} after position {position}"
                )
            if not 0 <= piece.param < self._tables[table].num_params:
                raise ValueError(f"{piece} names no parameter of table {table}")
            if piece.length == 0:
                continue
            if piece.start > position:  # padding before the piece
                offsets.append(piece.start)
                slots.append(-1)
            offsets.append(piece.start + piece.length)
            slots.append(piece.param)
            position = piece.start + piece.length
        if position < numel:
            offsets.append(numel)
            slots.append(-1)
        self._layouts[id(param)] = _Layout(
            offsets=offsets,
            slots=torch.tensor(slots, dtype=torch.int64, device=local.device),
            table=table,
        )

    def _layout(self, param: Tensor) -> _Layout:
        layout = self._layouts.get(id(param))
        if layout is None:
            raise RuntimeError(
                "e_dist: the optimizer was handed a tensor that its piece map does "
                f"not know (shape {tuple(param.shape)}); the sharding framework "
                "replaced its parameters after the map was built"
            )
        return layout

    def offsets(self, param: Tensor) -> list[int]:
        return self._layout(param).offsets

    def _tables_in_step(self, layouts: Sequence[_Layout]) -> list[int]:
        if self.reduces_every_step:
            return list(range(len(self._tables)))
        return sorted({layout.table for layout in layouts})

    def full_sums(self, params: Sequence[Tensor], sums: Tensor) -> Tensor:
        layouts = [self._layout(p) for p in params]
        device = sums.device if len(params) else self._default_device()
        full = sums.clone()

        # One buffer per reduction, its tables side by side.
        columns: dict[int, int] = {}
        widths: dict[Groups, int] = {}
        for table in self._tables_in_step(layouts):
            groups = self._tables[table].groups
            columns[table] = widths.get(groups, 0)
            widths[groups] = columns[table] + self._tables[table].num_params
        buffers = {
            g: torch.zeros(2, w, dtype=torch.float64, device=device)
            for g, w in widths.items()
        }

        picks, row = [], 0
        for layout in layouts:
            rows = torch.arange(row, row + len(layout.slots), device=device)
            row += len(layout.slots)
            real = layout.slots >= 0
            rows, index = rows[real], layout.slots[real] + columns[layout.table]
            groups = self._tables[layout.table].groups
            buffers[groups].index_add_(1, index, sums[rows].T.to(torch.float64))
            picks.append((rows, index, groups))
        _all_reduce(buffers)
        for rows, index, groups in picks:
            full[rows] = buffers[groups][:, index].T.to(full.dtype)
        return full

    def global_sq_sum(self, params: Sequence[Tensor], sq_sums: Tensor) -> Tensor:
        layouts = [self._layout(p) for p in params]
        device = sq_sums.device if len(params) else self._default_device()
        totals = {
            self._tables[t].groups: torch.zeros((), dtype=torch.float64, device=device)
            for t in self._tables_in_step(layouts)
        }
        row = 0
        for layout in layouts:
            rows = sq_sums[row : row + len(layout.slots)]
            row += len(layout.slots)
            real = layout.slots >= 0
            groups = self._tables[layout.table].groups
            totals[groups] = totals[groups] + rows[real].to(torch.float64).sum()
        _all_reduce(totals)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for value in totals.values():
            total = total + value
        return total

    def _default_device(self) -> torch.device:
        for layout in self._layouts.values():
            return layout.slots.device
        return torch.device("cpu")
