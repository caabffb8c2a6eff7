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


def _all_reduce(buffer: Tensor, ranges: dict[Groups, tuple[int, int]]) -> None:
    """Sum rows ``[a, b)`` of ``buffer`` over each group of their reduction, in
    place, with one all-reduce per distinct process group: the rows that a
    group sums travel together.

    Every process holds the same reductions in the same order, so the
    collectives line up; sums over several groups commute, so their order is
    free.
    """
    order: list[Any] = []
    for groups in ranges:
        order += [g for g in groups if all(g is not h for h in order)]
    for group in order:
        spans = [ab for groups, ab in ranges.items() if any(g is group for g in groups)]
        if len(spans) == 1:
            a, b = spans[0]
            dist.all_reduce(buffer[a:b], group=group)  # rows: contiguous
            continue
        packed = torch.cat([buffer[a:b] for a, b in spans])
        dist.all_reduce(packed, group=group)
        row = 0
        for a, b in spans:
            buffer[a:b] = packed[row : row + b - a]
            row += b - a


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

    def parameter_ids(self, params: Sequence[Tensor]) -> Tensor | None:
        """The parameter of each segment of ``params`` as an index that every
        process shares, padding segments as :attr:`num_parameters`; None
        where each tensor is a whole parameter of its own."""
        return None

    @property
    def num_parameters(self) -> int | None:
        """How many parameters :meth:`parameter_ids` numbers (None: none)."""
        return None


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


@dataclass
class _Plan:
    width: int  # rows of the step's norm buffer
    ranges: dict[Groups, tuple[int, int, int]]  # reduction: (index, first row, end)
    real: Tensor  # segments that belong to a parameter (not padding)
    ids: Tensor  # every segment's parameter id, num_parameters for padding
    rows: Tensor  # their rows in the buffer
    reduction: Tensor  # their reduction's index
    device: torch.device


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
        self._plans: dict[tuple[int, ...], _Plan] = {}
        self.reduces_every_step = reduces_every_step

    def add_table(self, num_params: int, groups: Groups) -> int:
        """Declare a parameter list summed over ``groups``; returns its id."""
        self._tables.append(_Table(num_params, tuple(groups)))
        self._plans.clear()
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
        self._plans.clear()
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

    def _plan(self, params: Sequence[Tensor]) -> _Plan:
        """Where each segment of ``params`` goes in the step's buffers; cached,
        since the same parameters come back step after step."""
        key = tuple(id(p) for p in params)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        layouts = [self._layout(p) for p in params]
        tables = (
            range(len(self._tables))
            if self.reduces_every_step
            else sorted({layout.table for layout in layouts})
        )
        # Rows of one buffer: each reduction's tables side by side.
        reductions: dict[Groups, list[int]] = {}
        for table in tables:
            reductions.setdefault(self._tables[table].groups, []).append(table)
        base, ranges, row = {}, {}, 0
        for r, (groups, members) in enumerate(reductions.items()):
            start = row
            for table in members:
                base[table] = row
                row += self._tables[table].num_params
            ranges[groups] = (r, start, row)
        device = layouts[0].slots.device if layouts else self._default_device()
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        rows = torch.cat(
            [
                torch.where(lay.slots >= 0, lay.slots + base[lay.table], -1)
                for lay in layouts
            ]
            or [empty]
        )
        reduction = torch.cat(
            [
                torch.full_like(lay.slots, ranges[self._tables[lay.table].groups][0])
                for lay in layouts
            ]
            or [empty]
        )
        real = torch.nonzero(rows >= 0).flatten()
        firsts = [0]  # each table's first id: tables numbered one after another
        for table in self._tables:
            firsts.append(firsts[-1] + table.num_params)
        ids = torch.cat(
            [
                torch.where(lay.slots >= 0, lay.slots + firsts[lay.table], firsts[-1])
                for lay in layouts
            ]
            or [empty]
        )
        plan = _Plan(
            width=row,
            ranges=ranges,
            real=real,
            ids=ids,
            rows=rows[real],
            reduction=reduction[real],
            device=device,
        )
        if len(self._plans) > 64:  # parameters without gradients vary: bound it
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def full_sums(self, params: Sequence[Tensor], sums: Tensor) -> Tensor:
        plan = self._plan(params)
        buffer = torch.zeros(plan.width, 2, dtype=torch.float64, device=plan.device)
        buffer.index_add_(0, plan.rows, sums[plan.real].to(torch.float64))
        _all_reduce(buffer, {g: (a, b) for g, (_, a, b) in plan.ranges.items()})
        full = sums.clone()
        full[plan.real] = buffer[plan.rows].to(full.dtype)
        return full

    def global_sq_sum(self, params: Sequence[Tensor], sq_sums: Tensor) -> Tensor:
        plan = self._plan(params)
        totals = torch.zeros(len(plan.ranges), dtype=torch.float64, device=plan.device)
        totals.index_add_(0, plan.reduction, sq_sums[plan.real].to(torch.float64))
        _all_reduce(totals, {g: (r, r + 1) for g, (r, _, _) in plan.ranges.items()})
        return totals.sum()

    def parameter_ids(self, params: Sequence[Tensor]) -> Tensor:
        return self._plan(params).ids

    @property
    def num_parameters(self) -> int:
        return sum(table.num_params for table in self._tables)

    def _default_device(self) -> torch.device:
        for layout in self._layouts.values():
            return layout.slots.device
        return torch.device("cpu")
