"""Optimizers by name, one table for DeepSpeed configs and FSDP scripts."""

from __future__ import annotations

import re

import pytest
import torch

import e_dist
from e_dist import registry


def params():
    return [torch.nn.Parameter(torch.zeros(3))]


def test_builds_every_name():
    assert isinstance(registry.build("ALTO", params(), lr=1e-2), e_dist.ALTO)
    for name, base in registry.E_BASES.items():
        opt = registry.build(name, params(), lr=1e-3, alpha=0.5, beta=0.01)
        assert isinstance(opt, e_dist.E)
        assert type(opt.base_optimizer).__name__ == base
        assert (opt.alpha, opt.beta) == (0.5, 0.01)
    opt = registry.build("E", params(), base="RMSprop", lr=1e-3)
    assert type(opt.base_optimizer) is torch.optim.RMSprop


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        (
            "Lion",
            {},
            "unknown optimizer 'Lion'; known: ['ALTO', 'E', 'EAdam', 'EAdamW', 'ESGD']",
        ),
        ("E", {"lr": 1e-3}, "optimizer 'E' needs base"),
        (
            "E",
            {"base": "Nope"},
            "E's base must name a torch.optim optimizer, got 'Nope'",
        ),
        (
            "ALTO",
            {"momentum": 0.9},
            "unknown key(s) ['momentum'] in the params of optimizer 'ALTO'",
        ),
        (
            "ESGD",
            {"betas": (0.9, 0.99)},
            "unknown key(s) ['betas'] in the params of optimizer 'ESGD'",
        ),
    ],
)
def test_refuses_bad_names_and_keys(name, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        registry.build(name, params(), **kwargs)
