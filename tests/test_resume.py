"""Resume: N steps, save, fresh optimizer, load, N more == 2N straight, bitwise."""

from __future__ import annotations

import io

import ALTO as reference_alto
import E as reference_e
import pytest
import torch
from models import clone, make_model, max_rel_error, train

import e_dist
from e_dist.update import GRAD_EMA

N = 6


def roundtrip(state_dict):
    """Through bytes, as a checkpoint file would carry it."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def make_alto(model):
    return e_dist.ALTO(e_dist.weight_decay_groups(model), lr=1e-2)


def make_e_adamw(model):
    return e_dist.E(torch.optim.AdamW(model.parameters(), lr=1e-3), alpha=-5, beta=0.99)


def make_e_sgd(model):
    base = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    return e_dist.E(base, alpha=0.5, beta=0.01)


def assert_same_state(a, b):
    for (_pa, sa), (_pb, sb) in zip(a.state.items(), b.state.items()):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key


@pytest.mark.parametrize("make", [make_alto, make_e_adamw, make_e_sgd])
@pytest.mark.parametrize("model_name", ["tiny_lm", "tiny_cnn"])
def test_resume_is_bitwise(model_name, make):
    straight = make_model(model_name)
    interrupted = clone(straight)
    straight_opt = make(straight)
    train(straight, straight_opt, 2 * N)

    first_opt = make(interrupted)
    train(interrupted, first_opt, N)
    saved = roundtrip(first_opt.state_dict())
    assert all(GRAD_EMA in entry for entry in saved["state"].values())

    resumed = make_model(model_name, seed=123)  # other weights, then loaded
    resumed.load_state_dict(interrupted.state_dict())
    resumed_opt = make(resumed)
    resumed_opt.load_state_dict(saved)
    train(resumed, resumed_opt, N, start=N)

    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert_same_state(straight_opt, resumed_opt)


# From the reference package's format the continuation is compared with the
# reference's own uninterrupted run: float64, 1e-10 relative, as in
# test_reference_parity.py.
@pytest.mark.parametrize("model_name", ["tiny_lm", "tiny_cnn"])
def test_alto_resumes_from_reference_state(model_name):
    ref_model = make_model(model_name, torch.float64)
    ref = reference_alto.create_ALTO_optimizer(ref_model, 1e-2)
    train(ref_model, ref, N, dtype=torch.float64)
    saved = roundtrip(ref.state_dict())
    assert "prev_grad" in saved["state"][0]

    ours_model = clone(ref_model)
    ours = e_dist.ALTO(e_dist.weight_decay_groups(ours_model), lr=1e-2)
    ours.load_state_dict(saved)
    train(ours_model, ours, N, start=N, dtype=torch.float64)
    train(ref_model, ref, N, start=N, dtype=torch.float64)
    for p, q in zip(ours_model.parameters(), ref_model.parameters()):
        assert max_rel_error(p, q) < 1e-10
    for p, q in zip(ours_model.parameters(), ref_model.parameters()):
        assert int(ours.state[p]["step"]) == ref.state[q]["step"] == 2 * N
        assert max_rel_error(ours.state[p]["exp_avg"], ref.state[q]["exp_avg"]) < 1e-10


@pytest.mark.parametrize("model_name", ["tiny_lm", "tiny_cnn"])
def test_e_resumes_from_reference_state(model_name):
    ref_model = make_model(model_name, torch.float64)
    ref = reference_e.E(torch.optim.Adam(ref_model.parameters(), lr=1e-3))
    train(ref_model, ref, N, dtype=torch.float64)
    # The reference's state_dict() drops E's own state; its format is the base
    # entries plus prev_grad and exp_grad_diff.
    saved = ref.state_dict()
    for index, param in enumerate(ref_model.parameters()):
        entry = ref.state[param]
        saved["state"][index].update(
            prev_grad=entry["prev_grad"], exp_grad_diff=entry["exp_grad_diff"]
        )
    saved = roundtrip(saved)

    ours_model = clone(ref_model)
    ours = e_dist.E(torch.optim.Adam(ours_model.parameters(), lr=1e-3))
    ours.load_state_dict(saved)
    assert all("prev_grad" not in s for s in ours.state.values())
    train(ours_model, ours, N, start=N, dtype=torch.float64)
    train(ref_model, ref, N, start=N, dtype=torch.float64)
    for p, q in zip(ours_model.parameters(), ref_model.parameters()):
        assert max_rel_error(p, q) < 1e-10
