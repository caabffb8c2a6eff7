"""State dicts in the reference package's format and back; another optimizer's
state dict refused without a change.

Tolerance of the continuations: e_dist's closed form of E (one EMA) and the
reference's two buffers round differently, by about 1e-16 relative per
operation in float64, and Adam-style normalisation amplifies the difference
step after step. Over 10 float64 steps it stays below 3e-14 (measured), far
below 1e-10, the bound test_reference_parity.py uses for 100 steps.
"""

from __future__ import annotations

import copy
import logging
import re
from fractions import Fraction

import ALTO as reference_alto
import E as reference_e
import pytest
import torch
from models import clone, make_model, max_rel_error, train

import e_dist
from e_dist.checkpoint import io
from e_dist.checkpoint.io import CheckpointError
from e_dist.checkpoint.reference import convert_file, from_reference, to_reference
from e_dist.update import GRAD_EMA, grad_ema_from_reference

F64 = torch.float64
BEFORE = 6  # steps before the conversion
AFTER = 10  # steps after it, compared
TOL = 1e-10
MODELS = ["tiny_lm", "tiny_cnn"]

# The reference ALTO's entry keys, in the order its step() creates them.
REFERENCE_ALTO_ENTRY = [
    "step", "exp_avg", "exp_avg_sq", "prev_grad", "exp_grad_diff",
    "bias_corr_m", "bias_corr_v",
]  # fmt: skip
REFERENCE_ALTO_GROUP = {"lr", "betas", "eps", "alp", "weight_decay", "params"}

# E's base optimizers, with the paper's presets (large and small batch).
BASES = {
    "adamw": (lambda p: torch.optim.AdamW(p, lr=1e-3), {"alpha": -5.0, "beta": 0.99}),
    "sgd_momentum": (
        lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
        {"alpha": 0.5, "beta": 0.01},
    ),
}


def convert_through_files(state_dict, tmp_path, direction, optimizer, **kwargs):
    """Save, convert_file, load: the path a checkpoint takes."""
    src, dst = tmp_path / "src.pt", tmp_path / "dst.pt"
    io.atomic_save(state_dict, src)
    convert_file(src, dst, direction, optimizer, **kwargs)
    return torch.load(dst, weights_only=True)


def assert_states_close(ours, expected):
    """Two e_dist-format state dicts: same entries, keys and steps; tensors
    within TOL relative."""
    assert ours["state"].keys() == expected["state"].keys()
    for index, entry in ours["state"].items():
        other = expected["state"][index]
        assert entry.keys() == other.keys(), index
        for key, value in entry.items():
            if key == "step":
                assert float(value) == float(other[key]), index
            else:
                err = max_rel_error(value, other[key])
                assert err < TOL, f"entry {index} {key}: {err:.3g}"


def assert_params_close(model, ref_model):
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        err = max_rel_error(p, q)
        assert err < TOL, f"{name}: {err:.3g}"


def make_alto(model, lr=1e-2):
    return e_dist.ALTO(e_dist.weight_decay_groups(model), lr=lr)


def make_reference_alto(model, lr=1e-2):
    return reference_alto.create_ALTO_optimizer(model, lr)


def reference_e_state_dict(ref, model):
    """The reference E's state dict with E's own state added to its entries:
    its state_dict() drops prev_grad and exp_grad_diff."""
    saved = ref.state_dict()
    for index, param in enumerate(model.parameters()):
        entry = ref.state[param]
        saved["state"][index] = {
            **saved["state"][index],
            "prev_grad": entry["prev_grad"],
            "exp_grad_diff": entry["exp_grad_diff"],
        }
    return saved


# ---------------------------------------------------------------------------
# The mapping itself


@pytest.mark.timeout(30)
def test_prev_grad_mu_and_zero_difference_continue_the_reference_recursion():
    """prev_grad = mu, exp_grad_diff = 0 gives the reference's next a_k and
    every later explored gradient; the converse formula recovers mu."""
    gen = torch.Generator().manual_seed(0)
    beta, alpha = 0.99, -5.0
    c = alpha * (1 - beta)
    grads = [torch.randn(50, generator=gen, dtype=F64) for _ in range(12)]

    # Both forms up to step 4, from zero state.
    mu = torch.zeros(50, dtype=F64)
    for g in grads[:4]:
        mu = beta * mu + (1 - beta) * g
    # The reference continues from the converted pair, e_dist from mu.
    prev_grad, exp_grad_diff, ema = mu.clone(), torch.zeros_like(mu), mu.clone()
    for g in grads[4:]:
        exp_grad_diff = beta * exp_grad_diff + (1 - beta) * (g - prev_grad)
        prev_grad = g
        explored_reference = g + alpha * exp_grad_diff
        explored_ours = (1 + c) * g - c * ema
        ema = beta * ema + (1 - beta) * g
        assert max_rel_error(explored_ours, explored_reference) < 1e-14
        # The converse multiplies a_k by beta / (1 - beta) = 99 and subtracts:
        # float64 rounding times about 100.
        recovered = grad_ema_from_reference(prev_grad, exp_grad_diff, beta)
        assert max_rel_error(recovered, ema) < 1e-12


# ---------------------------------------------------------------------------
# ALTO


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model_name", MODELS)
def test_alto_state_continues_in_the_reference(model_name, tmp_path):
    model = make_model(model_name, F64)
    ours = make_alto(model)
    train(model, ours, BEFORE, dtype=F64)
    converted = convert_through_files(
        ours.state_dict(), tmp_path, "to-reference", "ALTO"
    )

    # The reference's own structure: its keys, in its order, an int step.
    for entry in converted["state"].values():
        assert list(entry) == REFERENCE_ALTO_ENTRY
        assert type(entry["step"]) is int and entry["step"] == BEFORE
    assert all(set(g) == REFERENCE_ALTO_GROUP for g in converted["param_groups"])

    ref_model = clone(model)
    ref = make_reference_alto(ref_model, lr=0.5)  # the dict's lr wins
    ref.load_state_dict(converted)
    assert ref.param_groups[0]["lr"] == 1e-2
    train(model, ours, AFTER, start=BEFORE, dtype=F64)
    train(ref_model, ref, AFTER, start=BEFORE, dtype=F64)

    assert_params_close(model, ref_model)
    assert_states_close(ours.state_dict(), from_reference(ref.state_dict(), "ALTO"))
    # The bias-corrected copies, as the reference's last step left them.
    ours_as_reference = to_reference(ours.state_dict(), "ALTO")["state"]
    for index, entry in ref.state_dict()["state"].items():
        for key in ("bias_corr_m", "bias_corr_v"):
            assert max_rel_error(ours_as_reference[index][key], entry[key]) < TOL


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model_name", MODELS)
def test_reference_alto_state_continues_in_e_dist(model_name, tmp_path):
    ref_model = make_model(model_name, F64)
    ref = make_reference_alto(ref_model)
    train(ref_model, ref, BEFORE, dtype=F64)
    converted = convert_through_files(
        ref.state_dict(), tmp_path, "from-reference", "ALTO"
    )
    for entry in converted["state"].values():
        assert list(entry) == ["step", GRAD_EMA, "exp_avg", "exp_avg_sq"]
        assert entry["step"].dtype == torch.float32
    for group in converted["param_groups"]:
        assert "alp" not in group and group["adaptation"] == "reference"

    model = clone(ref_model)
    ours = make_alto(model, lr=0.5)
    ours.load_state_dict(converted)
    assert ours.param_groups[0]["lr"] == 1e-2
    train(model, ours, AFTER, start=BEFORE, dtype=F64)
    train(ref_model, ref, AFTER, start=BEFORE, dtype=F64)

    assert_params_close(model, ref_model)
    assert_states_close(ours.state_dict(), from_reference(ref.state_dict(), "ALTO"))


@pytest.mark.timeout(30)
def test_round_trip_through_the_reference_format_is_exact_for_alto(tmp_path):
    model = make_model("tiny_lm", F64)
    ours = make_alto(model)
    train(model, ours, BEFORE, dtype=F64)
    there = convert_through_files(ours.state_dict(), tmp_path, "to-reference", "ALTO")
    back = from_reference(there, "ALTO")
    saved = ours.state_dict()
    for index, entry in saved["state"].items():
        assert back["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            assert torch.equal(back["state"][index][key], value), key
    assert back["param_groups"] == saved["param_groups"]


@pytest.mark.timeout(30)
def test_paper_adaptation_has_no_reference_form():
    model = make_model("tiny_lm")
    ours = e_dist.ALTO(e_dist.weight_decay_groups(model), adaptation="paper")
    train(model, ours, 1)
    with pytest.raises(CheckpointError, match=re.escape("adaptation='paper'")):
        to_reference(ours.state_dict(), "ALTO")


@pytest.mark.timeout(30)
def test_alto_loads_dicts_without_the_newer_group_keys():
    model = make_model("tiny_lm")
    ours = make_alto(model)
    train(model, ours, 2)
    saved = ours.state_dict()
    for group in saved["param_groups"]:
        del group["adaptation"], group["trust_eps"], group["weight_norm_eps"]
    fresh = make_alto(clone(model))
    fresh.load_state_dict(saved)
    assert all(g["adaptation"] == "reference" for g in fresh.param_groups)


# ---------------------------------------------------------------------------
# E


def make_e(model, base):
    make_base, preset = BASES[base]
    return e_dist.E(make_base(model.parameters()), **preset)


def make_reference_e(model, base):
    make_base, preset = BASES[base]
    return reference_e.E(make_base(model.parameters()), **preset)


def assert_e_matches_reference(model, ours, ref_model, ref, base):
    beta = BASES[base][1]["beta"]
    assert_params_close(model, ref_model)
    expected = from_reference(reference_e_state_dict(ref, ref_model), "E", beta=beta)
    assert_states_close(ours.state_dict(), expected)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("model_name", MODELS)
def test_e_state_continues_in_the_reference(model_name, base, tmp_path):
    model = make_model(model_name, F64)
    ours = make_e(model, base)
    train(model, ours, BEFORE, dtype=F64)
    converted = convert_through_files(ours.state_dict(), tmp_path, "to-reference", "E")
    for entry in converted["state"].values():
        assert GRAD_EMA not in entry
        assert not entry["exp_grad_diff"].any()

    ref_model = clone(model)
    ref = make_reference_e(ref_model, base)
    ref.load_state_dict(converted)
    # The reference E's load_state_dict gives everything to its base
    # optimizer; its own state goes in by hand.
    for index, param in enumerate(ref_model.parameters()):
        entry = converted["state"][index]
        ref.state[param] = {
            "step": 0,
            "prev_grad": entry["prev_grad"].clone(),
            "exp_grad_diff": entry["exp_grad_diff"].clone(),
        }
    train(model, ours, AFTER, start=BEFORE, dtype=F64)
    train(ref_model, ref, AFTER, start=BEFORE, dtype=F64)
    assert_e_matches_reference(model, ours, ref_model, ref, base)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("model_name", MODELS)
def test_reference_e_state_continues_in_e_dist(model_name, base, tmp_path):
    ref_model = make_model(model_name, F64)
    ref = make_reference_e(ref_model, base)
    train(ref_model, ref, BEFORE, dtype=F64)
    beta = BASES[base][1]["beta"]
    converted = convert_through_files(
        reference_e_state_dict(ref, ref_model), tmp_path, "from-reference", "E",
        beta=beta,
    )  # fmt: skip
    assert all("prev_grad" not in e for e in converted["state"].values())

    model = clone(ref_model)
    ours = make_e(model, base)
    ours.load_state_dict(converted)
    train(model, ours, AFTER, start=BEFORE, dtype=F64)
    train(ref_model, ref, AFTER, start=BEFORE, dtype=F64)
    assert_e_matches_reference(model, ours, ref_model, ref, base)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("base", BASES)
def test_reference_e_own_state_dict_resumes_as_the_reference_does(
    base, tmp_path, caplog
):
    """The reference E's state_dict() drops E's state; converted, grad_ema
    starts at zero, which is what the reference's own resume does."""
    ref_model = make_model("tiny_lm", F64)
    ref = make_reference_e(ref_model, base)
    train(ref_model, ref, BEFORE, dtype=F64)
    plain = ref.state_dict()

    model = clone(ref_model)
    ours = make_e(model, base)
    with pytest.raises(CheckpointError, match=re.escape("reference E's state_dict()")):
        ours.load_state_dict(plain)
    with caplog.at_level(logging.WARNING, logger="e_dist.checkpoint.reference"):
        converted = convert_through_files(
            plain, tmp_path, "from-reference", "E", beta=BASES[base][1]["beta"]
        )
    assert "grad_ema starts at zero" in caplog.text
    assert all(not e[GRAD_EMA].any() for e in converted["state"].values())
    ours.load_state_dict(converted)

    resumed_model = clone(ref_model)
    resumed = make_reference_e(resumed_model, base)
    resumed.load_state_dict(copy.deepcopy(plain))
    train(model, ours, AFTER, start=BEFORE, dtype=F64)
    train(resumed_model, resumed, AFTER, start=BEFORE, dtype=F64)
    assert_params_close(model, resumed_model)


@pytest.mark.timeout(30)
def test_from_reference_e_needs_beta():
    with pytest.raises(ValueError, match="needs beta"):
        from_reference({"state": {}, "param_groups": []}, "E")


# ---------------------------------------------------------------------------
# Another optimizer's state dict: refused, nothing changed


def alto_one_group(model):
    # One group, as the torch optimizers below have: torch's own group-count
    # check would not see a difference.
    return e_dist.ALTO(model.parameters(), lr=1e-2)


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)


def e_adamw(model):
    return make_e(model, "adamw")


def e_sgd(model):
    return make_e(model, "sgd_momentum")


def reference_alto_one_group(model):
    return reference_alto.ALTO(model.parameters(), betas=(0.99, 0.9, 0.99))


ADAM_KEYS = "betas, eps, lr, weight_decay"
SGD_KEYS = "dampening, lr, momentum, weight_decay"
ALTO_EXPECTED = (
    "ALTO.load_state_dict expected ALTO's state (three betas and alpha in every "
    "param group), found "
)
WRONG_TYPE = {
    "alto<-adamw": (
        alto_one_group, adamw,
        f"{ALTO_EXPECTED}the state of an optimizer with hyperparameters {ADAM_KEYS}, "
        "without E's grad_ema: param_groups[0] has betas=(0.9, 0.999), not three",
    ),
    "alto<-e_adamw": (
        alto_one_group, e_adamw,
        f"{ALTO_EXPECTED}E's state over an optimizer with hyperparameters "
        f"{ADAM_KEYS}: param_groups[0] has betas=(0.9, 0.999), not three",
    ),
    "alto<-sgd": (
        alto_one_group, sgd,
        f"{ALTO_EXPECTED}the state of an optimizer with hyperparameters {SGD_KEYS}, "
        "without E's grad_ema: param_groups[0] has no betas",
    ),
    "alto<-e_sgd": (
        alto_one_group, e_sgd,
        f"{ALTO_EXPECTED}E's state over an optimizer with hyperparameters "
        f"{SGD_KEYS}: param_groups[0] has no betas",
    ),
    "e_adamw<-alto": (
        e_adamw, alto_one_group,
        "E.load_state_dict expected E's state over AdamW, found ALTO's state: "
        "param_groups[0] has ALTO's three betas and alpha; load it into e_dist.ALTO",
    ),
    "e_adamw<-reference_alto": (
        e_adamw, reference_alto_one_group,
        "E.load_state_dict expected E's state over AdamW, found the reference "
        "package's ALTO state: param_groups[0] has ALTO's three betas and alpha",
    ),
    "e_adamw<-adamw": (
        e_adamw, adamw,
        "E.load_state_dict expected E's state over AdamW, found the state of an "
        f"optimizer with hyperparameters {ADAM_KEYS}, without E's grad_ema: no "
        "state entry holds grad_ema",
    ),
    "e_adamw<-e_sgd": (
        e_adamw, e_sgd,
        "E.load_state_dict expected E's state over AdamW, found E's state over an "
        f"optimizer with hyperparameters {SGD_KEYS}: param_groups[0] lacks betas, "
        "eps, which AdamW's groups hold",
    ),
    "e_sgd<-e_adamw": (
        e_sgd, e_adamw,
        "E.load_state_dict expected E's state over SGD, found E's state over an "
        f"optimizer with hyperparameters {ADAM_KEYS}: param_groups[0] lacks "
        "dampening, momentum, which SGD's groups hold",
    ),
    "e_sgd<-sgd": (e_sgd, sgd, "no state entry holds grad_ema"),
}  # fmt: skip


def snapshot(optimizer):
    """Every state tensor copied, every group value, by parameter identity."""
    state = {
        id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in entry.items()}
        for p, entry in optimizer.state.items()
    }
    groups = [
        {k: [id(p) for p in v] if k == "params" else copy.deepcopy(v)
         for k, v in group.items()}
        for group in optimizer.param_groups
    ]  # fmt: skip
    return state, groups


def assert_unchanged(optimizer, before):
    state, groups = snapshot(optimizer)
    assert state.keys() == before[0].keys()
    for key, entry in state.items():
        old = before[0][key]
        assert entry.keys() == old.keys()
        for name, value in entry.items():
            if torch.is_tensor(value):
                assert value.dtype == old[name].dtype
                assert value.device == old[name].device
                assert torch.equal(value, old[name]), name
            else:
                assert value == old[name], name
    assert groups == before[1]


def trained(make, model, steps=2):
    optimizer = make(model)
    train(model, optimizer, steps)
    return optimizer


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", WRONG_TYPE)
def test_another_optimizers_state_is_refused_and_changes_nothing(case):
    make_live, make_other, message = WRONG_TYPE[case]
    model = make_model("tiny_lm")
    live = trained(make_live, model)
    other = trained(make_other, clone(model)).state_dict()
    before = snapshot(live)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        live.load_state_dict(copy.deepcopy(other))
    assert_unchanged(live, before)
    train(model, live, 1, start=2)  # and it still steps


def drop_from_first_entry(key):
    def damage(state_dict):
        del state_dict["state"][0][key]

    return damage


def to_prev_grad_only(state_dict):
    entry = state_dict["state"][0]
    entry["prev_grad"] = entry.pop(GRAD_EMA)


DAMAGED = {
    "alto_lacks_exp_avg_sq": (
        alto_one_group, drop_from_first_entry("exp_avg_sq"), CheckpointError,
        "state entry 0 lacks exp_avg_sq",
    ),
    "alto_lacks_grad_ema": (
        alto_one_group, drop_from_first_entry(GRAD_EMA), CheckpointError,
        "state entry 0 lacks prev_grad, exp_grad_diff",
    ),
    "e_prev_grad_alone": (
        e_adamw, to_prev_grad_only, CheckpointError,
        "state entry 0 holds prev_grad without its partner",
    ),
    "alto_other_group_count": (
        alto_one_group, lambda sd: sd["param_groups"].append(
            {**sd["param_groups"][0], "params": []}
        ),
        ValueError, "different number of parameter groups",
    ),
    "e_other_param_count": (
        e_adamw, lambda sd: sd["param_groups"][0]["params"].pop(),
        ValueError, "doesn't match the size of optimizer's group",
    ),
    "not_a_state_dict": (
        alto_one_group, lambda sd: sd.pop("state"), CheckpointError,
        "expected an optimizer state dict (a dict with 'state' and 'param_groups')",
    ),
}  # fmt: skip


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", DAMAGED)
def test_damaged_or_mismatched_state_is_refused_and_changes_nothing(case):
    make, damage, error, message = DAMAGED[case]
    model = make_model("tiny_lm")
    live = trained(make, model)
    saved = copy.deepcopy(live.state_dict())
    damage(saved)
    before = snapshot(live)
    with pytest.raises(error, match=re.escape(message)):
        live.load_state_dict(saved)
    assert_unchanged(live, before)


@pytest.mark.timeout(30)
def test_structure_alone_identifies_e_state():
    """What torch.distributed.checkpoint and DeepSpeed pass through: only
    "state" and "param_groups"; entries of parameters without a gradient lack
    grad_ema; an optimizer that creates its state eagerly (Adagrad) has none
    before its first step."""
    model = make_model("tiny_lm")
    for p in model.head.parameters():
        p.requires_grad_(False)  # no gradient, no state, no grad_ema
    ours = e_adamw(model)
    train(model, ours, 2)
    saved = ours.state_dict()
    fresh = e_adamw(clone(model))
    fresh.load_state_dict(
        {"state": saved["state"], "param_groups": saved["param_groups"]}
    )

    eager = e_dist.E(torch.optim.Adagrad(model.parameters(), lr=1e-2))
    assert eager.state_dict()["state"] and not any(
        GRAD_EMA in e for e in eager.state_dict()["state"].values()
    )
    e_dist.E(torch.optim.Adagrad(clone(model).parameters())).load_state_dict(
        eager.state_dict()
    )


# ---------------------------------------------------------------------------
# Files


@pytest.mark.timeout(30)
def test_convert_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_file(tmp_path / "none.pt", tmp_path / "out.pt", "to-reference", "ALTO")

    tensor_file = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(CheckpointError, match="holds no optimizer state dict"):
        convert_file(tensor_file, tmp_path / "out.pt", "to-reference", "ALTO")

    pickled = tmp_path / "pickled.pt"
    torch.save({"state": {}, "param_groups": [], "lr": Fraction(1, 3)}, pickled)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        convert_file(pickled, tmp_path / "out.pt", "from-reference", "ALTO")

    with pytest.raises(ValueError, match="direction must be one of"):
        convert_file(tensor_file, tmp_path / "out.pt", "sideways", "ALTO")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        convert_file(tensor_file, tmp_path / "out.pt", "to-reference", "LAMB")
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.timeout(30)
def test_convert_file_refuses_the_wrong_optimizer(tmp_path):
    model = make_model("tiny_lm")
    saved = trained(e_adamw, model).state_dict()
    with pytest.raises(
        CheckpointError, match=re.escape("to_reference(optimizer='ALTO') expected")
    ):
        convert_through_files(saved, tmp_path, "to-reference", "ALTO")
    assert not (tmp_path / "dst.pt").exists()
