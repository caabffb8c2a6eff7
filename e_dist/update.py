"""The update math of E and ALTO, on plain local tensors.

Nothing here knows about processes or sharding. Each function takes lists of
local tensors (one per parameter or per flat partition) and, for every local
tensor, the offsets that cut it into segments: segment ``s`` of a tensor
covers the flattened elements ``[offsets[s], offsets[s + 1])``. One process
holding whole parameters has one segment per tensor, ``[0, numel]``. Sums are
returned per segment, in order, so the caller can add the segments of one
parameter together wherever they live.

With ``c = alpha * (1 - beta1)`` and bias corrections ``bc2 = 1 - beta2**k``,
``bc3 = 1 - beta3**k``, one ALTO step on a tensor is::

    g     = scale_grad * grad                      global-norm clip
    g~    = (1 + c) * g - c * mu                   E's gradient
    mu    = beta1 * mu + (1 - beta1) * g           grad_ema
    m     = beta2 * m + (1 - beta2) * g~           exp_avg
    v     = beta3 * v + (1 - beta3) * g~^2         exp_avg_sq
    r     = (m / bc2) / (sqrt(v / bc3) + eps) + weight_decay * theta
    theta = theta - step_size * r                  step_size = lr * trust ratio

Two implementations compute it: a reference path written with readable torch
ops, one tensor at a time, for any device; and multi-tensor CPU kernels
(``csrc/alto_cpu.cpp``) that the tests hold against the reference.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from e_dist import native

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor as _DTENSOR
else:  # pragma: no cover - torch builds without distributed

    class _DTENSOR:
        pass


# State keys. torch's names where the meaning is torch's.
STEP = "step"
EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"
GRAD_EMA = "grad_ema"  # mu: the EMA of raw gradients that E needs
# The reference package's keys, accepted on load and converted.
REF_PREV_GRAD = "prev_grad"
REF_EXP_GRAD_DIFF = "exp_grad_diff"
REF_BIAS_CORRECTED = ("bias_corr_m", "bias_corr_v")

Offsets = Sequence[Sequence[int]]

IMPLEMENTATIONS = ("auto", "native", "reference")


@dataclass(frozen=True)
class Moments:
    """Scalars of one ALTO step for tensors that share a step count."""

    c: float
    beta1: float
    beta2: float
    beta3: float
    bias_correction2: float
    bias_correction3: float
    eps: float
    weight_decay: float


def grad_ema_from_reference(prev_grad: Tensor, exp_grad_diff: Tensor, beta: float):
    """mu_{k-1} from the reference package's (g_{k-1}, a_{k-1}) state.

    With a_0 = 0 and g_0 = 0, a_k = (1 - beta) * (g_k - mu_{k-1}), hence
    mu_{k-1} = g_{k-1} - beta * a_{k-1} / (1 - beta).
    """
    return prev_grad - exp_grad_diff * (beta / (1.0 - beta))


def local(t: Tensor) -> Tensor:
    """This process's part of a DTensor, or the tensor itself.

    A DTensor's local tensor is its ``_local_tensor``; ``to_local()`` returns
    the same data through an autograd function, about 20 times slower, which
    adds up over five tensors per parameter per step.
    """
    if isinstance(t, _DTENSOR):
        inner = getattr(t, "_local_tensor", None)
        return inner if inner is not None else t.to_local()
    return t


def check_implementation(implementation: str) -> str:
    """``implementation`` if it names one, else ValueError."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}"
        )
    return implementation


def use_native(tensors: Sequence[Tensor], implementation: str) -> bool:
    """Whether the CPU kernels take these tensors."""
    if implementation == "reference":
        return False
    eligible = all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
    if implementation == "native" and not eligible:
        raise ValueError(
            "implementation='native' needs contiguous CPU tensors; use 'auto' to "
            "take the reference path for others"
        )
    return eligible and native.cpu_kernels() is not None


def _segments(t: Tensor, offsets: Sequence[int]) -> list[Tensor]:
    flat = t.view(-1)
    return [flat[lo:hi] for lo, hi in itertools.pairwise(offsets)]


def segment_sq_sums(
    tensors: Sequence[Tensor], offsets: Offsets, implementation: str = "auto"
) -> Tensor:
    """Sum of squares of every segment, as a float64 vector."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    if use_native(tensors, implementation):
        return native.cpu_kernels().segment_sq_sums(list(tensors), offsets)
    sums = [
        seg.double().square().sum()
        for t, off in zip(tensors, offsets, strict=True)
        for seg in _segments(t, off)
    ]
    return torch.stack(sums)


def explore(
    grads: Sequence[Tensor],
    grad_emas: Sequence[Tensor],
    c: float,
    beta: float,
    implementation: str = "auto",
) -> None:
    """E's transform in place: ``g = (1 + c) g - c mu``, ``mu = beta mu + (1 - beta) g``
    (both from the old values)."""
    if not grads:
        return
    if use_native([*grads, *grad_emas], implementation):
        native.cpu_kernels().e_explore(list(grads), list(grad_emas), c, beta)
        return
    for grad, grad_ema in zip(grads, grad_emas, strict=True):
        g_tilde = (1 + c) * grad - c * grad_ema
        grad_ema.mul_(beta).add_(grad, alpha=1 - beta)
        grad.copy_(g_tilde)


def _direction(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, h: Moments):
    """r = bias-corrected Adam direction plus decoupled weight decay."""
    m_hat = exp_avg / h.bias_correction2
    v_hat = exp_avg_sq / h.bias_correction3
    update = m_hat / (v_hat.sqrt() + h.eps)
    if h.weight_decay != 0:
        update = update + h.weight_decay * param
    return update


def advance(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    grad_emas: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    offsets: Offsets,
    scale_grad: Tensor,
    h: Moments,
    lr: float | None = None,
    implementation: str = "auto",
) -> Tensor | None:
    """ALTO's first pass: advance mu, exp_avg and exp_avg_sq in place.

    With ``lr`` None, return the per-segment ``[sum theta^2, sum r^2]`` as a
    ``[num_segments, 2]`` float64 tensor and leave theta alone; the caller
    turns the sums into trust ratios and calls :func:`apply`. With ``lr``
    given, take the step ``theta -= lr * r`` at once (no layer adaptation)
    and return None.
    """
    if not params:
        return None if lr is not None else torch.zeros(0, 2, dtype=torch.float64)
    if use_native(
        [*params, *grads, *grad_emas, *exp_avgs, *exp_avg_sqs], implementation
    ):
        sums = native.cpu_kernels().alto_advance(
            list(params), list(grads), list(grad_emas), list(exp_avgs),
            list(exp_avg_sqs), offsets, scale_grad.detach().cpu(), h.c, h.beta1,
            h.beta2, h.beta3, h.bias_correction2, h.bias_correction3, h.eps,
            h.weight_decay, 0.0 if lr is None else float(lr), lr is not None,
        )  # fmt: skip
        return None if lr is not None else sums

    sums = []
    for param, grad, grad_ema, exp_avg, exp_avg_sq, off in zip(
        params, grads, grad_emas, exp_avgs, exp_avg_sqs, offsets, strict=True
    ):
        # E: the explored gradient, from the raw (clipped) one and its EMA.
        g = grad * scale_grad.to(grad.dtype)
        g_tilde = (1 + h.c) * g - h.c * grad_ema
        grad_ema.mul_(h.beta1).add_(g, alpha=1 - h.beta1)

        # Adam's moments of the explored gradient.
        exp_avg.mul_(h.beta2).add_(g_tilde, alpha=1 - h.beta2)
        exp_avg_sq.mul_(h.beta3).addcmul_(g_tilde, g_tilde, value=1 - h.beta3)

        update = _direction(param, exp_avg, exp_avg_sq, h)
        if lr is not None:
            param.sub_(lr * update)
            continue
        for w, r in zip(_segments(param, off), _segments(update, off), strict=True):
            sums.append(
                torch.stack([w.double().square().sum(), r.double().square().sum()])
            )
    if lr is not None:
        return None
    return torch.stack(sums) if sums else torch.zeros(0, 2, dtype=torch.float64)


def apply(
    params: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    offsets: Offsets,
    step_sizes: Tensor,
    h: Moments,
    implementation: str = "auto",
) -> None:
    """ALTO's second pass: ``theta -= step_sizes[segment] * r`` in place."""
    if not params:
        return
    if use_native([*params, *exp_avgs, *exp_avg_sqs], implementation):
        native.cpu_kernels().alto_apply(
            list(params), list(exp_avgs), list(exp_avg_sqs), offsets,
            step_sizes.detach().cpu(), h.bias_correction2, h.bias_correction3,
            h.eps, h.weight_decay,
        )  # fmt: skip
        return
    index = 0
    for param, exp_avg, exp_avg_sq, off in zip(
        params, exp_avgs, exp_avg_sqs, offsets, strict=True
    ):
        update = _direction(param, exp_avg, exp_avg_sq, h)
        for w, r in zip(_segments(param, off), _segments(update, off), strict=True):
            w.sub_(step_sizes[index].to(w.dtype) * r)
            index += 1


def trust_ratios(
    sums: Tensor, mode: str, trust_eps: float, weight_norm_eps: float
) -> Tensor:
    """Layer-adaptation ratios from full ``[sum theta^2, sum r^2]`` rows.

    ``mode="reference"``: ``||theta|| / ||r||``, 1 where either norm is 0.
    ``mode="paper"``: ``phi / (||r|| + trust_eps * phi)`` with
    ``phi = ||theta|| + weight_norm_eps``.
    """
    weight_norm = sums[:, 0].sqrt()
    update_norm = sums[:, 1].sqrt()
    if mode == "paper":
        phi = weight_norm + weight_norm_eps
        return phi / (update_norm + trust_eps * phi)
    ok = (weight_norm > 0) & (update_norm > 0)
    return torch.where(ok, weight_norm / update_norm, torch.ones_like(weight_norm))
