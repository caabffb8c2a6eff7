"""Hyperparameter checks and the paper's presets by global batch size."""

from __future__ import annotations

import math
from typing import Any

# The paper's rule (Zhao et al., NeurIPS 2025): explore at large batch,
# exploit at small batch.
LARGE_BATCH = 1024
LARGE_BATCH_E = {"alpha": -5.0, "beta": 0.99}
SMALL_BATCH_E = {"alpha": 0.5, "beta": 0.01}


def e_preset(global_batch_size: int) -> dict[str, float]:
    """E's ``alpha`` and ``beta`` for a global batch size (sequences or images).

    Batch >= 1024: alpha = -5, beta = 0.99 (explore). Smaller: alpha = 0.5,
    beta = 0.01 (exploit).

    Example:
        >>> e_preset(4096)
        {'alpha': -5.0, 'beta': 0.99}
    """
    check_positive_int("global_batch_size", global_batch_size)
    return dict(LARGE_BATCH_E if global_batch_size >= LARGE_BATCH else SMALL_BATCH_E)


def alto_preset(global_batch_size: int) -> dict[str, Any]:
    """ALTO's ``alpha`` and ``betas`` for a global batch size.

    Example:
        >>> alto_preset(32)
        {'alpha': 0.5, 'betas': (0.01, 0.9, 0.99)}
    """
    e = e_preset(global_batch_size)
    return {"alpha": e["alpha"], "betas": (e["beta"], 0.9, 0.99)}


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_real(name: str, value: Any) -> float:
    """``value`` as a finite float, or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def check_range(
    name: str, value: Any, low: float, high: float, *, closed_high: bool = False
) -> float:
    """``value`` in ``[low, high)`` (or ``[low, high]``), else ValueError."""
    value = check_real(name, value)
    inside = low <= value <= high if closed_high else low <= value < high
    if not inside:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")
    return value


def check_non_negative(name: str, value: Any) -> float:
    value = check_real(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def check_stability(alpha: float, beta: float, beta_name: str) -> None:
    """The paper's Remark 2.2: ``|alpha * (1 - beta)| < 1``.

    Past it, E's gradient ``(1 + c) * g - c * mu`` with ``c = alpha * (1 - beta)``
    points against the gradient on the first step (``1 + c < 0``) or grows
    without bound.
    """
    c = alpha * (1.0 - beta)
    if abs(c) < 1.0:
        return
    hint = (
        " These are the reference ALTO class's defaults (betas=(0.1, 0.9, 0.99) "
        "with alpha=-5): its first step moves along -3.5 * g, uphill."
        if alpha == -5 and beta == 0.1
        else ""
    )
    first = 1.0 + c
    raise ValueError(
        f"alpha={alpha!r} with {beta_name}={beta!r} breaks the stability "
        f"constraint |alpha * (1 - {beta_name})| < 1 (here {abs(c):.4g}); the "
        f"first step would move along {first:.4g} * g.{hint} Use a {beta_name} "
        f"above {1 - 1 / abs(alpha):.4g} for this alpha (the paper pairs alpha=-5 "
        f"with {beta_name}=0.99), or a smaller |alpha|."
    )
