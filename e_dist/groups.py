"""The usual parameter grouping for ALTO and LAMB-style optimizers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from e_dist import hparams

# Normalisation layers whose parameters take no weight decay, and so no layer
# adaptation under ALTO's default. Subclasses count; so does any module whose
# class name ends in "Norm" (RMSNorm variants of model libraries that do not
# subclass torch's).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer for weight-decay purposes."""
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith("Norm")


def weight_decay_groups(
    model: nn.Module, weight_decay: float = 1e-4
) -> list[dict[str, Any]]:
    """Two parameter groups: decayed weights, and biases plus norm layers.

    Biases (parameters named ``bias``) and every parameter of a normalisation
    layer go to a group with ``weight_decay=0``; all other trainable
    parameters, embeddings included, to a group with ``weight_decay``. A
    parameter shared by several modules (tied embeddings) appears once.
    Frozen parameters are left out; empty groups are dropped.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> [len(g["params"]) for g in weight_decay_groups(model)]
        [1, 3]
    """
    weight_decay = hparams.check_non_negative("weight_decay", weight_decay)
    no_decay: dict[int, torch.Tensor] = {}
    for module in model.modules():
        norm = is_norm_layer(module)
        for name, param in module.named_parameters(recurse=False):
            if norm or name == "bias":
                no_decay[id(param)] = param
    decay, rest = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (rest if id(param) in no_decay else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
