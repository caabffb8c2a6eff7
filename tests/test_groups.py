"""weight_decay_groups: biases and normalisation layers take no decay."""

from __future__ import annotations

import re

import ALTO as reference_alto
import pytest
import torch
from models import make_model
from torch import nn

import e_dist


class MyLayerNorm(nn.LayerNorm):
    pass


class LlamaRMSNorm(nn.Module):  # not a torch subclass, matched by name
    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))


def ids(group):
    return {id(p) for p in group["params"]}


def test_norm_layers_biases_and_tied_weights():
    embed = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = embed.weight  # tied
    frozen = nn.Linear(8, 8)
    frozen.weight.requires_grad_(False)
    model = nn.ModuleDict(
        dict(
            embed=embed, head=head, frozen=frozen,
            ln=nn.LayerNorm(8), rms=nn.RMSNorm(8), bn=nn.BatchNorm1d(8),
            gn=nn.GroupNorm(2, 8), inorm=nn.InstanceNorm1d(8, affine=True),
            sub=MyLayerNorm(8), named=LlamaRMSNorm(8), lin=nn.Linear(8, 8),
        )
    )  # fmt: skip
    decay, no_decay = e_dist.weight_decay_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert ids(decay) == {id(embed.weight), id(model["lin"].weight)}
    expected = {id(model["lin"].bias), id(frozen.bias)}
    for name in ("ln", "rms", "bn", "gn", "inorm", "sub", "named"):
        expected |= {id(p) for p in model[name].parameters()}
    assert ids(no_decay) == expected
    all_params = decay["params"] + no_decay["params"]
    assert len(all_params) == len({id(p) for p in all_params})  # tied once


def test_empty_groups_are_dropped():
    groups = e_dist.weight_decay_groups(nn.Linear(3, 3, bias=False))
    assert len(groups) == 1 and groups[0]["weight_decay"] == 1e-4


def test_bad_weight_decay():
    with pytest.raises(
        ValueError, match=re.escape("weight_decay must be >= 0, got -1.0")
    ):
        e_dist.weight_decay_groups(nn.Linear(3, 3), weight_decay=-1.0)


@pytest.mark.parametrize("model_name", ["tiny_lm", "tiny_cnn"])
def test_same_split_as_the_reference_factory(model_name):
    model = make_model(model_name)
    ref = reference_alto.create_ALTO_optimizer(model, 1e-2).param_groups
    ours = e_dist.weight_decay_groups(model)
    assert [ids(g) for g in ours] == [ids(g) for g in ref]
