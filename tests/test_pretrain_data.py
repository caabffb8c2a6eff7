"""The main job's data: the embedded corpus and directories of token shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from e_dist.pretrain.data import embedded_corpus, shard_directory
from e_dist.pretrain.train import learning_rate, parse_args


def test_embedded_corpus_is_bytes_with_a_held_out_tail():
    data = embedded_corpus()
    assert data.vocab_size == 256
    train, val = len(data.train[0]), len(data.val[0])
    assert train > 1_000_000 and 0.04 < val / (train + val) < 0.06
    x, y = data.batch("train", 4, 32, seed=0, step=3, rank=1, world=2)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    again, _ = data.batch("train", 4, 32, seed=0, step=3, rank=1, world=2)
    assert torch.equal(x, again)  # a resumed run draws the same batch
    other, _ = data.batch("train", 4, 32, seed=0, step=3, rank=0, world=2)
    assert not torch.equal(x, other)


def test_shards_npy_bin_and_validation(tmp_path):
    np.save(tmp_path / "train_000.npy", np.arange(1000, dtype=np.uint16))
    np.arange(1000, 1500, dtype=np.uint16).tofile(tmp_path / "train_001.bin")
    np.save(tmp_path / "val_000.npy", np.full(300, 7, dtype=np.int32))
    data = shard_directory(tmp_path)
    assert data.vocab_size == 1500
    assert [len(s) for s in data.train] == [1000, 500] and len(data.val[0]) == 300
    assert isinstance(data.train[0], np.memmap) or data.train[0].base is not None
    x, _ = data.batch("val", 2, 16, seed=0, step=0)
    assert (x == 7).all()
    # Rank 1 of 2 reads the second half of each shard only.
    x, _ = data.batch("train", 64, 8, seed=1, step=0, rank=1, world=2)
    seen = set(x.flatten().tolist())
    assert seen <= set(range(500, 1000)) | set(range(1250, 1500))
    assert seen & set(range(500, 1000)) and seen & set(range(1250, 1500))
    assert shard_directory(tmp_path, vocab_size=4096).vocab_size == 4096


def test_shards_without_validation_hold_out_a_tail(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(2000) % 9)
    data = shard_directory(tmp_path)
    assert len(data.train[0]) == 1900 and len(data.val[0]) == 100


def test_bad_shard_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no \*\.npy or \*\.bin token shards"):
        shard_directory(tmp_path)
    np.save(tmp_path / "val.npy", np.arange(100))
    with pytest.raises(ValueError, match="holds only validation shards"):
        shard_directory(tmp_path)
    np.save(tmp_path / "x.npy", np.ones((3, 3)))
    with pytest.raises(ValueError, match="expected a 1-D integer token array"):
        shard_directory(tmp_path)


def test_schedule_and_arguments():
    args = parse_args(["--steps", "100", "--warmup", "10", "--min-lr-ratio", "0.1"])
    assert learning_rate(args, 1.0, 0) == pytest.approx(0.1)
    assert learning_rate(args, 1.0, 9) == pytest.approx(1.0)
    assert learning_rate(args, 1.0, 100) == pytest.approx(0.1)
    args.schedule = "linear"
    assert learning_rate(args, 1.0, 55) == pytest.approx(0.1 + 0.9 * 0.5)
    with pytest.raises(SystemExit):
        parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--compare", "ALTO,Lion"])
