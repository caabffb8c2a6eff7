"""ALTO: E's explored gradient fed to LAMB with bias correction."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from e_dist import hparams, update
from e_dist.pieces import SINGLE_PROCESS, PieceMap
from e_dist.update import (
    EXP_AVG,
    EXP_AVG_SQ,
    GRAD_EMA,
    STEP,
    Moments,
)

logger = logging.getLogger(__name__)

ADAPTATIONS = ("reference", "paper", "none")

# Added to the global gradient norm before dividing, as torch's
# clip_grad_norm_ does.
_CLIP_EPS = 1e-6


class ALTO(torch.optim.Optimizer):
    r"""ALTO (Zhao et al., NeurIPS 2025): LAMB with bias correction, stepping on
    E's explored gradient.

    For each parameter tensor :math:`\theta` at step :math:`k`, with
    :math:`c = \alpha (1 - \beta_1)`:

    .. math::
        g &= \mathrm{clip}(\nabla, \text{max\_grad\_norm})
             \quad\text{(global norm over all parameters)} \\
        \tilde g &= (1 + c)\, g - c\, \mu \\
        \mu &\leftarrow \beta_1 \mu + (1 - \beta_1)\, g \\
        m &\leftarrow \beta_2 m + (1 - \beta_2)\, \tilde g \\
        v &\leftarrow \beta_3 v + (1 - \beta_3)\, \tilde g^2 \\
        r &= \frac{m / (1 - \beta_2^k)}{\sqrt{v / (1 - \beta_3^k)} + \epsilon}
             + \lambda \theta \\
        \theta &\leftarrow \theta - \eta\, \rho\, r

    The trust ratio :math:`\rho` depends on the group's ``adaptation``:
    ``"reference"`` (default) uses :math:`\|\theta\| / \|r\|` (1 when either
    norm is 0) in groups with ``weight_decay != 0`` and :math:`\rho = 1`
    elsewhere, as the authors' code does; ``"paper"`` uses
    :math:`\phi / (\|r\| + \epsilon_2 \phi)`, :math:`\phi = \|\theta\| +
    \epsilon_3`, in the group whatever its decay; ``"none"`` uses
    :math:`\rho = 1`. Norms are over the whole parameter.

    State per parameter: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v) and
    ``grad_ema`` (mu): three tensors the size of the parameter.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
            :func:`e_dist.weight_decay_groups` makes the usual grouping.
        lr: learning rate :math:`\eta` (default 1e-3; the paper uses 1e-2).
        betas: :math:`(\beta_1, \beta_2, \beta_3)`, the decays of the gradient
            EMA, the first and the second moment (default (0.99, 0.9, 0.99)).
        alpha: E's strength :math:`\alpha`; negative explores, positive
            exploits (default -5). Needs :math:`|\alpha (1 - \beta_1)| < 1`.
        eps: :math:`\epsilon` in the denominator (default 1e-6).
        weight_decay: decoupled decay :math:`\lambda` (default 1e-4).
        max_grad_norm: clip the global gradient norm to this; None turns
            clipping off (default 1.0).
        adaptation: ``"reference"``, ``"paper"`` or ``"none"`` (default
            ``"reference"``), settable per group.
        trust_eps: :math:`\epsilon_2` of the paper's ratio (default 1e-6).
        weight_norm_eps: :math:`\epsilon_3` of the paper's ratio (default 1e-10).
        implementation: ``"auto"`` (CPU kernels where they apply, the reference
            path elsewhere), ``"native"`` or ``"reference"``.
        piece_map: how local tensors map onto whole parameters; the default
            is one process holding every parameter whole. Sharding backends
            pass their own.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = ALTO(e_dist.weight_decay_groups(model), lr=1e-2)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float, float] = (0.99, 0.9, 0.99),
        alpha: float = -5.0,
        eps: float = 1e-6,
        weight_decay: float = 1e-4,
        max_grad_norm: float | None = 1.0,
        *,
        adaptation: str = "reference",
        trust_eps: float = 1e-6,
        weight_norm_eps: float = 1e-10,
        implementation: str = "auto",
        piece_map: PieceMap | None = None,
    ) -> None:
        if max_grad_norm is not None:
            max_grad_norm = hparams.check_real("max_grad_norm", max_grad_norm)
            if max_grad_norm <= 0:
                raise ValueError(
                    f"max_grad_norm must be > 0, or None to turn clipping off, "
                    f"got {max_grad_norm!r}"
                )
        self.max_grad_norm = max_grad_norm
        self.implementation = update.check_implementation(implementation)
        # For logging, read outside step(): the global gradient norm before
        # ALTO's own clip (None when it does not clip); trust ratios below.
        self.last_grad_norm: Tensor | None = None
        self._ratio_log = _RatioLog()
        self._auto_piece_map = piece_map is None
        defaults = dict(
            lr=lr,
            betas=betas,
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            adaptation=adaptation,
            trust_eps=trust_eps,
            weight_norm_eps=weight_norm_eps,
        )
        _check_group(defaults)
        super().__init__(params, defaults)
        self.piece_map = piece_map or SINGLE_PROCESS
        self._find_pieces()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])
        if hasattr(self, "piece_map"):  # a group added after construction
            self._find_pieces()

    def _find_pieces(self) -> None:
        """Sharded parameters (DTensors, FSDP1's views) bring their own map."""
        if self._auto_piece_map:
            from e_dist.fsdp import auto_piece_map

            params = [p for g in self.param_groups for p in g["params"]]
            self.piece_map = auto_piece_map(params)

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer keeps only defaults, state and groups: a copy or
        # an unpickled ALTO would lose its clip, implementation and piece map.
        # The ratio log names parameters by identity: a copy starts a new one.
        return {**self.__dict__, "_ratio_log": _RatioLog()}

    @property
    def last_trust_ratios(self) -> Tensor | None:
        """The latest trust ratio of each parameter that this process holds a
        piece of and that a step has adapted, each parameter once, padding
        excluded (None before any). Reads the device: call it outside step().
        """
        return self._ratio_log.held()

    def gather_trust_ratios(self, group: Any = None) -> Tensor | None:
        """:attr:`last_trust_ratios` over every process of ``group`` (default:
        all): each adapted parameter once, in an order all processes share.
        A collective: every process must call it (outside step())."""
        return self._ratio_log.gathered(self.piece_map, group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of the reference package's ALTO.

        Reference entries (``prev_grad``, ``exp_grad_diff``, the bias-corrected
        copies, an integer ``step``) are converted exactly into ``grad_ema``
        and a tensor ``step`` (:func:`e_dist.checkpoint.reference.from_reference`).
        Another optimizer's state dict raises
        :class:`~e_dist.checkpoint.io.CheckpointError` and changes nothing.
        """
        # Imported on use: the checkpoint package builds on the optimizers.
        from e_dist.checkpoint.reference import as_alto_state

        converted = as_alto_state(state_dict, caller="ALTO.load_state_dict")
        state, groups = converted["state"], converted["param_groups"]
        groups = [_with_defaults(g, self.defaults) for g in groups]
        super().load_state_dict({"state": state, "param_groups": groups})
        # Moments live in the parameter's dtype; torch's loader casts them, but
        # a step count must stay a float32 CPU scalar.
        for entry in self.state.values():
            if STEP in entry:
                entry[STEP] = entry[STEP].to("cpu", torch.float32)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one optimization step; ``closure`` recomputes the loss first."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        buckets = self._buckets()
        scale_grad = self._clip_coefficient(buckets)

        # Pass 1: advance every state; collect norms where layers adapt.
        adaptive = []
        for bucket in buckets:
            h, lr = self._moments(bucket.group, bucket.step)
            if not _adapts(bucket.group):
                update.advance(*bucket.tensors, scale_grad, h, lr, self.implementation)
                continue
            sums = update.advance(
                *bucket.tensors, scale_grad, h, None, self.implementation
            )
            adaptive.append((bucket, h, lr, sums))
        if not adaptive and not self.piece_map.reduces_every_step:
            return loss

        # The whole parameters' norms: one reduction for all groups together.
        keys = [key for bucket, _, _, _ in adaptive for key in bucket.keys]
        sums = [a[3] for a in adaptive] or [torch.zeros(0, 2, dtype=torch.float64)]
        full = self.piece_map.full_sums(keys, torch.cat(sums))

        # Pass 2: step each segment by lr times its parameter's trust ratio.
        ratios, row = [], 0
        for bucket, h, lr, sums in adaptive:
            rows = full[row : row + sums.shape[0]]
            row += sums.shape[0]
            group = bucket.group
            ratio = update.trust_ratios(
                rows, group["adaptation"], group["trust_eps"], group["weight_norm_eps"]
            )
            ratios.append(ratio)
            params, _, _, exp_avgs, exp_avg_sqs, offsets = bucket.tensors
            update.apply(
                params, exp_avgs, exp_avg_sqs, offsets, lr * ratio, h,
                self.implementation,
            )  # fmt: skip
        if ratios:
            self._ratio_log.record(self.piece_map, keys, torch.cat(ratios))
        return loss

    def _buckets(self) -> list[_Bucket]:
        """Tensors with gradients, by group, device, dtype and step count.

        Creates missing state and advances every step count.
        """
        buckets = []
        for group in self.param_groups:
            by_key: dict[tuple, _Bucket] = {}
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("ALTO does not support sparse gradients")
                state = self.state[param]
                if not state:
                    _init_state(state, param)
                # Step counts live on the CPU, as torch's optimizers keep them,
                # so reading one synchronizes no device.
                state[STEP] += 1
                step = int(state[STEP])
                key = (param.device, param.dtype, step)
                bucket = by_key.get(key)
                if bucket is None:
                    bucket = by_key[key] = _Bucket(group, step)
                bucket.add(
                    param,
                    (grad, state[GRAD_EMA], state[EXP_AVG], state[EXP_AVG_SQ]),
                    self.piece_map.offsets(param),
                )
            buckets += by_key.values()
        return buckets

    def _clip_coefficient(self, buckets: list[_Bucket]) -> Tensor:
        """min(1, max_grad_norm / (global grad norm + 1e-6)), as a tensor."""
        if self.max_grad_norm is None or (
            not buckets and not self.piece_map.reduces_every_step
        ):
            return torch.ones((), dtype=torch.float64)
        sums = [
            update.segment_sq_sums(b.tensors[1], b.tensors[5], self.implementation)
            for b in buckets
        ]
        if sums:
            device = sums[0].device
            sums = torch.cat([s.to(device) for s in sums])
        else:
            sums = torch.zeros(0, dtype=torch.float64)
        keys = [key for bucket in buckets for key in bucket.keys]
        total_norm = self.piece_map.global_sq_sum(keys, sums).sqrt()
        self.last_grad_norm = total_norm
        return (self.max_grad_norm / (total_norm + _CLIP_EPS)).clamp(max=1.0)

    @staticmethod
    def _moments(group: dict[str, Any], step: int) -> tuple[Moments, Any]:
        beta1, beta2, beta3 = group["betas"]
        h = Moments(
            c=group["alpha"] * (1.0 - beta1),
            beta1=beta1,
            beta2=beta2,
            beta3=beta3,
            bias_correction2=1.0 - beta2**step,
            bias_correction3=1.0 - beta3**step,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )
        return h, group["lr"]


class _RatioLog:
    """Each parameter's latest trust ratio, in a table indexed by parameter
    ids that every process shares (the piece map's; where tensors are whole
    parameters, the order in which steps first meet them). NaN marks a
    parameter this process has no ratio of; one extra slot takes padding.
    Recording is index_copy_ on the step's device: no host synchronisation.
    """

    def __init__(self) -> None:
        self.table: Tensor | None = None
        self.whole_ids: dict[int, int] = {}  # id(tensor) -> parameter id
        self.cache: dict[tuple[int, ...], Tensor] = {}

    def _ids(self, piece_map: PieceMap, params: list[Tensor], device) -> Tensor:
        ids = piece_map.parameter_ids(params)
        if ids is not None:
            return ids
        key = tuple(id(p) for p in params)
        ids = self.cache.get(key)
        if ids is None:
            ids = torch.tensor(
                [self.whole_ids.setdefault(k, len(self.whole_ids)) for k in key],
                dtype=torch.int64,
            ).to(device)
            if len(self.cache) > 64:  # parameters without gradients vary
                self.cache.clear()
            self.cache[key] = ids
        return ids

    def _size(self, piece_map: PieceMap) -> int:
        size = piece_map.num_parameters
        return len(self.whole_ids) if size is None else size

    def _table(self, size: int, device: torch.device) -> Tensor:
        table = self.table
        if table is None or table.numel() < size + 1 or table.device != device:
            grown = torch.full(
                (size + 1,), float("nan"), dtype=torch.float64, device=device
            )
            if table is not None:
                old = min(table.numel() - 1, size)
                grown[:old] = table[:old].to(device)
            self.table = table = grown
        return table

    def record(self, piece_map: PieceMap, params: list[Tensor], ratios: Tensor) -> None:
        ids = self._ids(piece_map, params, ratios.device)
        table = self._table(self._size(piece_map), ratios.device)
        table.index_copy_(0, ids, ratios.to(table.dtype))

    def held(self) -> Tensor | None:
        if self.table is None:
            return None
        ratios = self.table[:-1]
        return ratios[~ratios.isnan()]

    def gathered(self, piece_map: PieceMap, group: Any) -> Tensor | None:
        if not (dist.is_available() and dist.is_initialized()):
            return self.held()
        size = self._size(piece_map)
        device = self.table.device if self.table is not None else torch.device("cpu")
        table = self._table(size, device)  # the same size on every process
        # Ratios are >= 0: the maximum over processes with -1 for "none here"
        # is the ratio of whichever processes hold the parameter (all alike).
        present = table[:size].nan_to_num(nan=-1.0)
        if "nccl" in str(dist.get_backend(group)) and present.device.type == "cpu":
            present = present.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(present, op=dist.ReduceOp.MAX, group=group)
        return present[present >= 0].cpu()


class _Bucket:
    """Parameters of one group that share device, dtype and step count.

    ``keys`` are the optimizer's own parameter objects (what a piece map knows
    them by); ``tensors`` their local views: ``(params, grads, grad_emas,
    exp_avgs, exp_avg_sqs, offsets)``.
    """

    def __init__(self, group: dict[str, Any], step: int) -> None:
        self.group = group
        self.step = step
        self.keys: list[Tensor] = []
        self.tensors: tuple[list, ...] = tuple([] for _ in range(6))

    def add(
        self, param: Tensor, others: tuple[Tensor, ...], offsets: list[int]
    ) -> None:
        self.keys.append(param)
        for column, tensor in zip(self.tensors, (param, *others), strict=False):
            column.append(update.local(tensor))
        self.tensors[5].append(offsets)


def _adapts(group: dict[str, Any]) -> bool:
    """Whether the group's steps take a trust ratio."""
    mode = group["adaptation"]
    return mode == "paper" or (mode == "reference" and group["weight_decay"] != 0)


def _init_state(state: dict[str, Any], param: Tensor) -> None:
    state[STEP] = torch.zeros((), dtype=torch.float32)
    for key in (GRAD_EMA, EXP_AVG, EXP_AVG_SQ):
        state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)


def _with_defaults(group: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A loaded group with the keys that older or reference dicts lack."""
    group = dict(group)
    for key, value in defaults.items():
        group.setdefault(key, value)
    return group


def _check_group(group: dict[str, Any]) -> None:
    """Validate one group's hyperparameters; ValueError names the bad one."""
    lr = group["lr"]
    if torch.is_tensor(lr):
        if lr.numel() != 1:
            raise ValueError(f"lr as a tensor must have one element, got {lr.shape}")
    else:
        hparams.check_non_negative("lr", lr)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 3:
        raise ValueError(
            f"betas must be three numbers (beta1 for the gradient EMA, beta2 and "
            f"beta3 for the moments), got {betas!r}"
        )
    for i, beta in enumerate(betas):
        hparams.check_range(f"betas[{i}]", beta, 0.0, 1.0)
    group["betas"] = tuple(float(b) for b in betas)
    group["alpha"] = hparams.check_real("alpha", group["alpha"])
    hparams.check_stability(group["alpha"], group["betas"][0], "betas[0]")
    eps = hparams.check_real("eps", group["eps"])
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    hparams.check_non_negative("weight_decay", group["weight_decay"])
    if group["adaptation"] not in ADAPTATIONS:
        raise ValueError(
            f"adaptation must be one of {ADAPTATIONS}, got {group['adaptation']!r}"
        )
    hparams.check_non_negative("trust_eps", group["trust_eps"])
    hparams.check_non_negative("weight_norm_eps", group["weight_norm_eps"])
