"""Small models and a deterministic training loop shared by the tests."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from e_dist import weight_decay_groups

# Rows per batch of StraddleNet.
STRADDLE_BATCH = 4


class TinyLM(nn.Module):
    """Embedding, LayerNorm, biased linears, a head: every grouping case."""

    def __init__(self, vocab: int = 37, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = x + self.down(torch.tanh(self.up(self.norm(x))))
        return self.head(x)

    @staticmethod
    def batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(1000 + step)
        tokens = torch.randint(0, 37, (8, 6), generator=gen)
        return tokens, torch.roll(tokens, -1, dims=1)

    @staticmethod
    def loss(model: nn.Module, batch) -> torch.Tensor:
        tokens, targets = batch
        logits = model(tokens)
        return nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten()
        )


class TinyCNN(nn.Module):
    """Convolutions with biases and BatchNorm, a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        # No bias before BatchNorm: its gradient would be rounding noise,
        # which Adam-style normalisation turns into full-size steps.
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x)).mean(dim=(2, 3))
        return self.fc(x)

    @staticmethod
    def batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(2000 + step)
        images = torch.randn(6, 3, 6, 6, generator=gen).to(dtype)
        return images, torch.randint(0, 5, (6,), generator=gen)

    @staticmethod
    def loss(model: nn.Module, batch) -> torch.Tensor:
        images, labels = batch
        return nn.functional.cross_entropy(model(images).float(), labels)


MODELS = {"tiny_lm": TinyLM, "tiny_cnn": TinyCNN}


def make_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    return MODELS[name]().to(dtype)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    start: int = 0,
    dtype: torch.dtype = torch.float32,
    on_step: Callable[[int], None] | None = None,
) -> None:
    """``steps`` optimizer steps on the model's fixed batches from ``start``."""
    kind = type(model)
    for step in range(start, start + steps):
        optimizer.zero_grad()  # the reference E takes no set_to_none
        kind.loss(model, kind.batch(step, dtype)).backward()
        optimizer.step()
        if on_step is not None:
            on_step(step)


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (absolute where e is all zero)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.numel() == 0:
        return 0.0
    diff = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    return diff / scale if scale > 0 else diff


def trust_ratios_compared(optimizer, twin_optimizer) -> dict:
    """ALTO's trust ratios over every rank against a single-process twin's:
    their counts (each adapted parameter once) and the worst relative error,
    sorted, since the two number parameters differently. A collective."""
    gather = getattr(optimizer, "gather_trust_ratios", None)
    if gather is None:
        return {}
    ours, theirs = gather(), twin_optimizer.gather_trust_ratios()
    counts = [ours.numel(), theirs.numel()]
    error = (
        max_rel_error(ours.sort().values, theirs.sort().values)
        if counts[0] == counts[1]
        else float("inf")
    )
    return {"trust_ratio_counts": counts, "trust_ratio_error": error}


class StraddleNet(nn.Module):
    """Sizes that straddle ZeRO partitions; ``scale`` (one element) leaves
    most ranks with empty pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.fc1 = nn.Linear(6, 13)
        self.fc2 = nn.Linear(13, 6)
        self.scale = nn.Parameter(torch.ones(1))
        self.head = nn.Linear(6, 11, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens[:, :-1])
        x = x + self.fc2(torch.tanh(self.fc1(self.norm(x)))) * self.scale
        logits = self.head(x).float()
        return nn.functional.cross_entropy(
            logits.flatten(0, 1), tokens[:, 1:].flatten()
        )


def straddle_batch(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 11, (STRADDLE_BATCH, 7), generator=gen)


def straddle_groups(model: StraddleNet) -> list[dict]:
    """Three groups; the last is one element, so most ranks hold nothing of it."""
    decay, no_decay = weight_decay_groups(model, 1e-4)
    decay = [p for p in decay["params"] if p is not model.scale]
    return [
        {"params": decay, "weight_decay": 1e-4},
        {"params": no_decay["params"], "weight_decay": 0.0},
        {"params": [model.scale], "weight_decay": 1e-4},
    ]
