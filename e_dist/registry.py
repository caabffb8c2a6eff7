"""Optimizers by name, one table for every backend.

The DeepSpeed config's ``"optimizer": {"type": ...}`` and FSDP training
scripts (``build("EAdamW", model.parameters(), lr=3e-4)``) read the same
names.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch

from e_dist.alto import ALTO
from e_dist.e import E

# E in front of a torch optimizer, by shorthand.
E_BASES: dict[str, str] = {"EAdam": "Adam", "EAdamW": "AdamW", "ESGD": "SGD"}
NAMES = ("ALTO", "E", *E_BASES)
E_KEYS = ("alpha", "beta", "noise_std", "grad_clip")
ALTO_KEYS = tuple(
    k
    for k in inspect.signature(ALTO.__init__).parameters
    if k not in ("self", "params")
)


def base_class(name: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim`` optimizer class called ``name``."""
    base = getattr(torch.optim, name, None) if isinstance(name, str) else None
    if not (isinstance(base, type) and issubclass(base, torch.optim.Optimizer)):
        raise ValueError(f"E's base must name a torch.optim optimizer, got {name!r}")
    return base


def _check_keys(name: str, kwargs: dict[str, Any], accepted: Iterable[str]) -> None:
    accepted = sorted(set(accepted))
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in the params of optimizer {name!r}; "
            f"accepted: {accepted}"
        )


def build(
    name: str, params: Any, *, extra_keys: Iterable[str] = (), **kwargs: Any
) -> torch.optim.Optimizer:
    """Optimizer ``name`` over ``params``.

    ``"ALTO"`` takes ALTO's arguments. ``"E"`` takes ``base`` (a
    ``torch.optim`` class name), E's arguments (``alpha``, ``beta``,
    ``noise_std``, ``grad_clip``) and the base's; ``"EAdam"``, ``"EAdamW"`` and
    ``"ESGD"`` name their base. An unknown key raises ValueError listing the
    accepted ones (plus ``extra_keys``, which the caller consumed itself).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> build("EAdamW", model.parameters(), lr=1e-3, alpha=-5, beta=0.99)
    """
    if name not in NAMES:
        raise ValueError(f"unknown optimizer {name!r}; known: {list(NAMES)}")
    kwargs = dict(kwargs)
    if name == "ALTO":
        _check_keys(name, kwargs, [*ALTO_KEYS, *extra_keys])
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return ALTO(params, **kwargs)

    if name == "E":
        if "base" not in kwargs:
            raise ValueError(
                "optimizer 'E' needs base, the torch.optim optimizer it wraps "
                '(e.g. "AdamW"); or use EAdamW, EAdam or ESGD'
            )
        base_name = kwargs.pop("base")
    else:
        base_name = E_BASES[name]
    base = base_class(base_name)
    base_keys = [
        k
        for k in inspect.signature(base.__init__).parameters
        if k not in ("self", "params")
    ]
    accepted = [*base_keys, *E_KEYS, *extra_keys, *(["base"] if name == "E" else [])]
    _check_keys(name, kwargs, accepted)
    e_kwargs = {k: kwargs.pop(k) for k in E_KEYS if k in kwargs}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return E(base(params, **kwargs), **e_kwargs)
