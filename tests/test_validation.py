"""Every hyperparameter is checked when an optimizer is built."""

from __future__ import annotations

import re

import pytest
import torch

import e_dist


def params():
    return [torch.nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "lr must be >= 0, got -1.0"),
        ({"lr": float("nan")}, "lr must be finite, got nan"),
        ({"lr": "0.1"}, "lr must be a real number, got '0.1'"),
        ({"betas": (0.9, 0.99)}, "betas must be three numbers"),
        ({"betas": (1.0, 0.9, 0.99)}, "betas[0] must be in [0.0, 1.0), got 1.0"),
        ({"betas": (0.99, -0.1, 0.99)}, "betas[1] must be in [0.0, 1.0), got -0.1"),
        ({"betas": (0.99, 0.9, 1.5)}, "betas[2] must be in [0.0, 1.0), got 1.5"),
        ({"eps": 0.0}, "eps must be > 0, got 0.0"),
        ({"weight_decay": -1e-4}, "weight_decay must be >= 0, got -0.0001"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0, or None"),
        (
            {"adaptation": "lars"},
            "adaptation must be one of ('reference', 'paper', 'none')",
        ),
        ({"trust_eps": -1.0}, "trust_eps must be >= 0"),
        ({"weight_norm_eps": -1.0}, "weight_norm_eps must be >= 0"),
        ({"implementation": "cuda"}, "implementation must be one of"),
        ({"alpha": float("inf")}, "alpha must be finite"),
        (
            {"alpha": -5.0, "betas": (0.5, 0.9, 0.99)},
            "alpha=-5.0 with betas[0]=0.5 breaks the stability constraint "
            "|alpha * (1 - betas[0])| < 1 (here 2.5)",
        ),
        (
            {"alpha": 3.0, "betas": (0.5, 0.9, 0.99)},
            "alpha=3.0 with betas[0]=0.5 breaks the stability constraint",
        ),
    ],
)
def test_alto_rejects(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        e_dist.ALTO(params(), **kwargs)


def test_alto_refuses_the_reference_class_defaults_and_says_why():
    with pytest.raises(ValueError) as info:
        e_dist.ALTO(params(), betas=(0.1, 0.9, 0.99), alpha=-5)
    text = str(info.value)
    assert "reference ALTO class's defaults" in text
    assert "-3.5 * g, uphill" in text
    assert "betas[0]=0.99" in text


def test_alto_checks_groups_added_later():
    opt = e_dist.ALTO(params())
    with pytest.raises(ValueError, match=re.escape("betas[0] must be in [0.0, 1.0)")):
        opt.add_param_group({"params": params(), "betas": (2.0, 0.9, 0.99)})
    with pytest.raises(ValueError, match="stability constraint"):
        opt.add_param_group({"params": params(), "alpha": -200.0})


def test_alto_accepts_the_paper_settings():
    e_dist.ALTO(params(), **e_dist.alto_preset(4096), lr=1e-2)
    e_dist.ALTO(params(), **e_dist.alto_preset(64), lr=1e-2)
    e_dist.ALTO(params(), lr=torch.tensor(1e-2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 1.0}, "beta must be in [0.0, 1.0), got 1.0"),
        ({"alpha": None}, "alpha must be a real number, got None"),
        ({"alpha": -5.0, "beta": 0.5}, "alpha=-5.0 with beta=0.5 breaks the stability"),
        ({"noise_std": -1.0}, "noise_std must be >= 0, got -1.0"),
        ({"grad_clip": 0.0}, "grad_clip must be > 0, or None to turn it off, got 0.0"),
    ],
)
def test_e_rejects(kwargs, message):
    base = torch.optim.SGD(params(), lr=0.1)
    with pytest.raises(ValueError, match=re.escape(message)):
        e_dist.E(base, **kwargs)


def test_e_needs_an_optimizer():
    with pytest.raises(
        TypeError, match=re.escape("base_optimizer must be a torch.optim.Optimizer")
    ):
        e_dist.E(params())


@pytest.mark.parametrize("batch", [0, -4, 1.5, True])
def test_presets_reject_bad_batch_sizes(batch):
    with pytest.raises(
        ValueError, match="global_batch_size must be a positive integer"
    ):
        e_dist.e_preset(batch)


def test_presets_follow_the_paper():
    assert e_dist.e_preset(1024) == {"alpha": -5.0, "beta": 0.99}
    assert e_dist.e_preset(1023) == {"alpha": 0.5, "beta": 0.01}
    assert e_dist.alto_preset(32768) == {"alpha": -5.0, "betas": (0.99, 0.9, 0.99)}
    assert e_dist.alto_preset(128) == {"alpha": 0.5, "betas": (0.01, 0.9, 0.99)}
