"""Consolidated checkpoints on one process, and the errors of bad files.

Bad inputs fail with a CheckpointError that names the file and what is wrong,
and leave the live model and optimizer bitwise as they were.
"""

from __future__ import annotations

import collections
import copy
import os

import pytest
import torch
from models import TinyLM, make_model, train

import e_dist
from e_dist.checkpoint import CheckpointError, consolidated, io, universal, zero
from e_dist.checkpoint.__main__ import main as checkpoint_cli

pytestmark = pytest.mark.timeout(120)


def alto(model):
    return e_dist.ALTO(e_dist.weight_decay_groups(model, 1e-4), lr=1e-2)


def eadamw(model):
    groups = e_dist.weight_decay_groups(model, 1e-2)
    return e_dist.E(torch.optim.AdamW(groups, lr=1e-3), alpha=-5, beta=0.99)


def trained(make_optimizer, steps=3, seed=0):
    model = make_model("tiny_lm", seed=seed)
    optimizer = make_optimizer(model)
    train(model, optimizer, steps)
    return model, optimizer


def live(model, optimizer):
    """Everything a failed load must leave untouched."""
    return copy.deepcopy((model.state_dict(), optimizer.state_dict()))


def same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("make_optimizer", [alto, eadamw])
def test_round_trip_continues_bitwise(tmp_path, make_optimizer):
    model, optimizer = trained(make_optimizer)
    path = tmp_path / "run.pt"
    consolidated.save_from(model, optimizer, path, {"global_steps": 3})
    straight = trained(make_optimizer)  # the same run again, uninterrupted
    model2, optimizer2 = trained(make_optimizer, steps=1, seed=1)
    assert consolidated.load_into(model2, optimizer2, path) == {"global_steps": 3}
    assert same(live(model2, optimizer2), live(model, optimizer))
    train(straight[0], straight[1], 4, start=3)
    train(model2, optimizer2, 4, start=3)
    assert same(live(model2, optimizer2), live(*straight))


def test_another_optimizer_type_is_refused(tmp_path):
    model, optimizer = trained(alto)
    path = tmp_path / "alto.pt"
    consolidated.save_from(model, optimizer, path)
    model2, optimizer2 = trained(eadamw, seed=1)
    before = live(model2, optimizer2)
    with pytest.raises(CheckpointError, match="holds the state of ALTO, but the "
                       "optimizer it is loaded into is E over AdamW; nothing was "
                       "loaded"):  # fmt: skip
        consolidated.load_into(model2, optimizer2, path)
    assert same(live(model2, optimizer2), before)


def test_another_model_is_refused(tmp_path):
    model, optimizer = trained(alto)
    path = tmp_path / "alto.pt"
    consolidated.save_from(model, optimizer, path)
    other = TinyLM(width=8)
    other_optimizer = alto(other)
    with pytest.raises(CheckpointError, match=r"has shape .* nothing was loaded"):
        consolidated.load_into(other, other_optimizer, path)


@pytest.fixture
def saved(tmp_path):
    model, optimizer = trained(alto)
    path = tmp_path / "alto.pt"
    consolidated.save_from(model, optimizer, path)
    model2, optimizer2 = trained(alto, seed=1)
    return path, model2, optimizer2, live(model2, optimizer2)


def test_truncated_file_is_refused(saved):
    path, model, optimizer, before = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"alto.pt is truncated or corrupted"):
        consolidated.load_into(model, optimizer, path)
    assert same(live(model, optimizer), before)


def test_flipped_byte_is_refused(saved):
    """A byte inside tensor data: the zip archive still reads, the checksum
    does not match."""
    path, model, optimizer, before = saved
    data = bytearray(path.read_bytes())
    tensor_data = data.index(b"data/0") + 200  # inside the first storages
    data[tensor_data] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        consolidated.load_into(model, optimizer, path)
    assert same(live(model, optimizer), before)


def test_pickled_objects_are_refused_with_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": consolidated.FORMAT, "payload": os.getcwd}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        consolidated.load(path)


class _EnumByName:
    """Pickles as ``getattr(ZeroStageEnum, "gradients")``, as Python 3.11.2
    pickles DeepSpeed's ZeRO stage in every ZeRO optimizer file."""

    def __reduce__(self):
        from deepspeed.runtime.zero.config import ZeroStageEnum

        return getattr, (ZeroStageEnum, "gradients")


class _GetattrEscape:
    """``getattr`` on an allowed class that is no enum: the first step out."""

    def __reduce__(self):
        return getattr, (collections.OrderedDict, "__class__")


def test_deepspeed_files_take_enum_members_by_name_and_nothing_else(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"zero_stage": _EnumByName()}}, path)
    loaded = zero.load_file(path)
    assert loaded["optimizer_state_dict"]["zero_stage"] is ZeroStageEnum.gradients
    torch.save({"payload": _GetattrEscape()}, path)
    with pytest.raises(CheckpointError, match="is not an enum member"):
        zero.load_file(path)


def test_not_a_checkpoint_and_missing(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state": {}}, path)
    with pytest.raises(CheckpointError, match="not an e_dist consolidated checkpoint"):
        consolidated.load(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        consolidated.load(tmp_path / "missing.pt")


def test_atomic_save_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "file.pt"
    io.atomic_save({"a": torch.ones(3)}, path)

    def crash(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        io.atomic_save({"a": torch.zeros(3)}, path)
    assert torch.equal(io.load(path)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["file.pt"]  # no temporary


def test_universal_from_consolidated_and_its_errors(tmp_path, capsys):
    model, optimizer = trained(alto)
    path = tmp_path / "alto.pt"
    consolidated.save_from(model, optimizer, path)
    out = tmp_path / "universal" / "t"
    assert checkpoint_cli(["universal", str(path), str(out)]) == 0
    assert (tmp_path / "universal" / "latest_universal").read_text() == "t"
    assert sorted(p.name for p in (out / "zero" / "up.weight").iterdir()) == [
        "exp_avg.pt", "exp_avg_sq.pt", "fp32.pt", "grad_ema.pt", "step.pt",
    ]  # fmt: skip
    assert checkpoint_cli(["verify", str(out)]) == 0
    assert checkpoint_cli(["universal", str(path), str(out)]) == 1  # exists
    assert "exists" in capsys.readouterr().err
    # A file changed after the manifest was written.
    victim = out / "zero" / "up.weight" / "grad_ema.pt"
    victim.write_bytes(victim.read_bytes()[:-10])
    assert checkpoint_cli(["verify", str(out)]) == 1
    assert "grad_ema.pt is truncated or corrupted" in capsys.readouterr().err
    # What DeepSpeed's own converter writes has no record of e_dist.
    state_file = out / "zero" / "optimizer_state.pt"
    state = torch.load(state_file, weights_only=True)
    del state[universal.INFO]
    torch.save(state, state_file)
    victim.unlink()
    io.commit(out)
    with pytest.raises(CheckpointError, match="drops ALTO's and E's grad_ema"):
        universal.read_global_state(out)


@pytest.mark.parametrize("make_optimizer", [alto, eadamw])
def test_copies_keep_every_setting(make_optimizer):
    """copy.deepcopy (and pickle) of a model with its optimizer steps on as
    the original: ALTO's clip, implementation and piece map come along."""
    model, optimizer = trained(make_optimizer)
    model2, optimizer2 = copy.deepcopy((model, optimizer))
    train(model, optimizer, 2, start=3)
    train(model2, optimizer2, 2, start=3)
    assert same(live(model2, optimizer2), live(model, optimizer))
