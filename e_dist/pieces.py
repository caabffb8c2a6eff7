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
