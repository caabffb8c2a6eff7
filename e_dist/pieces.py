"""Where the pieces of each parameter live, and how their norms add up.

Words used across the package:

- parameter: the model's whole tensor, as the user defined it.
- piece: the part of one parameter that one process holds (may be empty).
- local tensor: whatever tensor this process's optimizer steps on; a flat
  partition of a sharding framework holds many pieces.
- segment: a piece as seen inside its local tensor, a ``[start, end)`` range
  of the flattened local tensor.

The optimizers ask a piece map three things: the segment offsets of each
local tensor, the full ``[sum theta^2, sum r^2]`` of every segment's
parameter given the local sums of all segments, and the global sum of
squared gradients given the local one. The map for one process holding whole
parameters answers with one segment per tensor and the sums unchanged;
sharding backends answer with one collective per question.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class PieceMap:
    """The piece map of one process that holds every parameter whole."""

    def offsets(self, local: Tensor) -> list[int]:
        """Segment boundaries of a local tensor: here, one segment."""
        return [0, local.numel()]

    def full_sums(self, locals_: Sequence[Tensor], sums: Tensor) -> Tensor:
        """Whole-parameter ``[sum theta^2, sum r^2]`` for every segment.

        ``sums`` has one row per segment of ``locals_``, in order; the result
        has the same shape, each row holding the sums over its parameter.
        """
        return sums

    def global_sq_sum(self, local_sq_sum: Tensor) -> Tensor:
        """The sum of squared gradients over every process."""
        return local_sq_sum


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
    slots: Tensor  # parameter index of each segment, -1 for padding
    table: int  # which parameter list the indices refer to
    group: Any  # the process group that sums the pieces (None: nothing to sum)


@dataclass
class _Table:
    num_params: int
    group: Any


class ShardedPieceMap(PieceMap):
    """Local tensors that hold pieces of parameters, summed over process groups.

    A sharding backend registers each local tensor once with :meth:`add`: the
    pieces it holds and the parameter list (a *table*: one DeepSpeed group,
    one ZeRO-3 sub-group) whose indices the pieces use. Every process holding
    part of a table registers it with the same parameter count and process
    group, and steps the same tables in the same order, so that per step()
    the norms take one all-reduce of a ``[2, parameters]`` buffer per process
    group, whatever each process holds.
    """

    def __init__(self) -> None:
        self._layouts: dict[int, _Layout] = {}
        self._tables: list[_Table] = []
        self.grad_norm_group: Any = None

    def add_table(self, num_params: int, group: Any) -> int:
        """Declare a parameter list summed over ``group``; returns its id."""
        self._tables.append(_Table(num_params, group))
        return len(self._tables) - 1

    def add(self, local: Tensor, pieces: Sequence[Piece], table: int) -> None:
        """Register the pieces of ``local``; the rest of it is padding."""
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
            if piece.start > position:  # padding before the piece
                offsets.append(piece.start)
                slots.append(-1)
            if piece.length > 0:
                offsets.append(piece.start + piece.length)
                slots.append(piece.param)
                position = piece.start + piece.length
        if position < numel:
            offsets.append(numel)
            slots.append(-1)
        self._layouts[id(local)] = _Layout(
            offsets=offsets,
            slots=torch.tensor(slots, dtype=torch.int64, device=local.device),
            table=table,
            group=self._tables[table].group,
        )

    def _layout(self, local: Tensor) -> _Layout:
        layout = self._layouts.get(id(local))
        if layout is None:
            raise RuntimeError(
                "e_dist: the optimizer was handed a tensor that its piece map does "
                f"not know (shape {tuple(local.shape)}); the sharding framework "
                "replaced its partitions after the map was built"
            )
        return layout

    def offsets(self, local: Tensor) -> list[int]:
        return self._layout(local).offsets

    def full_sums(self, locals_: Sequence[Tensor], sums: Tensor) -> Tensor:
        layouts = [self._layout(t) for t in locals_]
        full = sums.clone()
        # Tables stepped together that share a process group go into one
        # buffer, side by side, so that each group takes one all-reduce.
        by_group: dict[int, list[tuple[int, _Layout]]] = {}
        row = 0
        for layout in layouts:
            by_group.setdefault(id(layout.group), []).append((row, layout))
            row += len(layout.offsets) - 1
        for members in by_group.values():
            group = members[0][1].group
            bases, width, seen = [], 0, {}
            for _, layout in members:
                if layout.table not in seen:
                    seen[layout.table] = width
                    width += self._tables[layout.table].num_params
                bases.append(seen[layout.table])
            buffer = sums.new_zeros(2, width)
            picks = []
            for (start, layout), base in zip(members, bases, strict=True):
                rows = torch.arange(
                    start, start + len(layout.slots), device=sums.device
                )
                real = layout.slots >= 0
                rows, index = rows[real], layout.slots[real] + base
                buffer.index_add_(1, index, sums[rows].T)
                picks.append((rows, index))
            if group is not None:
                dist.all_reduce(buffer, group=group)
            for rows, index in picks:
                full[rows] = buffer[:, index].T
        return full

    def global_sq_sum(self, local_sq_sum: Tensor) -> Tensor:
        if self.grad_norm_group is None:
            return local_sq_sum
        total = local_sq_sum.clone()
        dist.all_reduce(total, group=self.grad_norm_group)
        return total
