"""Token streams for pretraining: an embedded corpus, or pre-tokenized shards.

- The embedded default needs no network: the bytes of the Python standard
  library's top-level modules (about 4.7 MB of text on CPython 3.11), present
  wherever Python is, as byte-level tokens (vocabulary 256). The last 5 % is
  held out for evaluation.
- A directory of pre-tokenized shards (``*.npy`` arrays, or raw ``*.bin``
  files of uint16 tokens), memory-mapped. Shards whose name contains ``val``
  are held out; without any, the last 5 % of the tokens is.

Batches are sampled at random offsets from a generator seeded by (seed,
step, rank), so every rank reads its own slice and a resumed run draws the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HOLD_OUT = 0.05


@dataclass
class TokenData:
    train: list[np.ndarray]  # shards, memory-mapped where they come from files
    val: list[np.ndarray]
    vocab_size: int
    source: str

    def batch(
        self,
        split: str,
        size: int,
        context: int,
        seed: int,
        step: int,
        rank: int = 0,
        world: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` sequences of ``context`` tokens and their next tokens.

        Training batches of rank ``r`` come from the ``r``-th of ``world``
        equal slices of each shard; evaluation batches from all of it.
        """  # fmt: skip
        shards = self.train if split == "train" else self.val
        if split != "train":
            rank, world = 0, 1
        slices = []
        for shard in shards:
            lo, hi = len(shard) * rank // world, len(shard) * (rank + 1) // world
            if hi - lo > context + 1:
                slices.append(shard[lo:hi])
        if not slices:
            raise ValueError(
                f"no {split} shard slice holds more than a context of {context} + 1 "
                f"tokens ({world} ranks)"
            )
        gen = np.random.default_rng([seed, step, rank, split == "val"])
        lengths = np.array([len(s) - context - 1 for s in slices], dtype=np.float64)
        picks = gen.choice(len(slices), size=size, p=lengths / lengths.sum())
        rows = np.stack(
            [
                slices[i][start : start + context + 1]
                for i in picks
                for start in [gen.integers(0, len(slices[i]) - context - 1)]
            ]
        ).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]


def embedded_corpus() -> TokenData:
    """Byte-level tokens of the standard library's top-level modules."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no Python modules under {stdlib} to train on")
    data = np.frombuffer(b"".join(f.read_bytes() for f in files), dtype=np.uint8)
    split = int(len(data) * (1 - HOLD_OUT))
    return TokenData([data[:split]], [data[split:]], 256, f"stdlib:{stdlib}")


def _load(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        array = np.load(path, mmap_mode="r")
    else:
        array = np.memmap(path, dtype=np.uint16, mode="r")
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{path}: expected a 1-D integer token array, got {array.dtype} "
            f"{array.shape}"
        )
    return array


def shard_directory(
    directory: str | os.PathLike, vocab_size: int | None = None
) -> TokenData:
    """Memory-mapped token shards from ``directory``.

    Without ``vocab_size``, the largest token id found sets it (a full pass
    over the data); give it for large data sets.
    """
    root = Path(directory)
    shards = sorted([*root.glob("*.npy"), *root.glob("*.bin")])
    if not shards:
        raise FileNotFoundError(f"no *.npy or *.bin token shards in {root}")
    val = [_load(s) for s in shards if "val" in s.name]
    train = [_load(s) for s in shards if "val" not in s.name]
    if not train:
        raise ValueError(f"{root} holds only validation shards (names with 'val')")
    if not val:  # hold out the end of the last shard
        last = train[-1]
        split = int(len(last) * (1 - HOLD_OUT))
        train[-1], val = last[:split], [last[split:]]
    if vocab_size is None:  # one pass over the shards to find it
        vocab_size = max(int(s.max()) for s in [*train, *val] if len(s)) + 1
    return TokenData(train, val, vocab_size, f"shards:{root}")
