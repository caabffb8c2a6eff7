"""What step() promises beyond its numbers: no host reads, any float dtype."""

from __future__ import annotations

import copy

import pytest
import torch
from models import make_model, train
from torch.overrides import TorchFunctionMode

import e_dist

HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__"}


class HostReadDetector(TorchFunctionMode):
    """Records every read of a tensor's value into Python, step counts aside.

    Step counts are CPU scalars, as in torch's optimizers, and reading them
    waits for no device; every other read would stall an accelerator.
    """

    def __init__(self, allowed):
        super().__init__()
        self.allowed = {id(t) for t in allowed}
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS and args and id(args[0]) not in self.allowed:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("implementation", ["native", "reference"])
@pytest.mark.parametrize("adaptation", ["reference", "paper"])
def test_alto_step_reads_nothing_into_python(implementation, adaptation):
    model = make_model("tiny_lm")
    opt = e_dist.ALTO(
        e_dist.weight_decay_groups(model), adaptation=adaptation,
        implementation=implementation,
    )  # fmt: skip
    train(model, opt, 1)
    steps = [s["step"] for s in opt.state.values()]
    detector = HostReadDetector(steps)
    with detector:
        train(model, opt, 2, start=1)
    assert detector.reads == []


def test_e_step_reads_nothing_into_python():
    model = make_model("tiny_lm")
    opt = e_dist.E(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    detector = HostReadDetector([])
    with detector:
        train(model, opt, 2)
    assert detector.reads == []


def test_the_detector_catches_a_read():
    detector = HostReadDetector([])
    with detector:
        torch.ones(()).item()
    assert detector.reads == ["item"]


@pytest.mark.parametrize("implementation", ["native", "reference"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str
)
def test_alto_keeps_state_in_the_parameter_dtype(dtype, implementation):
    model = make_model("tiny_lm", dtype)
    opt = e_dist.ALTO(
        e_dist.weight_decay_groups(model), lr=1e-2, implementation=implementation
    )
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 3, dtype=dtype)
    for p, old in zip(model.parameters(), before):
        assert p.dtype == dtype and torch.isfinite(p).all() and not torch.equal(p, old)
        state = opt.state[p]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq", "grad_ema"}
        assert all(
            state[k].dtype == dtype for k in ("exp_avg", "exp_avg_sq", "grad_ema")
        )
        assert state["step"].dtype == torch.float32 and int(state["step"]) == 3


def test_alto_skips_parameters_without_gradients_and_groups_without_any():
    model = make_model("tiny_lm")
    model.head.weight.requires_grad_(False)
    opt = e_dist.ALTO(
        [*e_dist.weight_decay_groups(model), {"params": [model.head.weight]}]
    )
    train(model, opt, 2)
    assert model.head.weight not in opt.state
    assert int(opt.state[model.embed.weight]["step"]) == 2


def test_alto_clips_the_global_norm():
    """With lr=0 nothing moves; the moments show the gradient was scaled."""
    param = torch.nn.Parameter(torch.zeros(2))
    opt = e_dist.ALTO(
        [param], lr=0.0, max_grad_norm=0.5, betas=(0.0, 0.0, 0.0), alpha=0.0
    )
    param.grad = torch.tensor([3.0, 4.0])  # norm 5
    opt.step()
    expected = torch.tensor([3.0, 4.0]) * (0.5 / (5.0 + 1e-6))
    assert torch.allclose(opt.state[param]["exp_avg"], expected, rtol=1e-6)


def test_trust_ratios_are_logged_once_per_adapted_parameter():
    """The first step from zero state, worked by hand: mu = 0, so the bias-
    corrected moments are (1 + c) g and its square, and r = g~ / (|g~| + eps)
    + wd * theta, with theta before the step. Groups without decay take no
    ratio and are not logged."""
    model = make_model("tiny_lm", torch.float64)
    groups = e_dist.weight_decay_groups(model, 1e-2)
    opt = e_dist.ALTO(groups, lr=1e-2, alpha=-5, max_grad_norm=None)
    assert opt.last_trust_ratios is None
    decayed = groups[0]["params"]
    before = [p.detach().clone() for p in decayed]
    train(model, opt, 1, dtype=torch.float64)
    c = -5 * (1 - 0.99)
    expected = []
    for theta, p in zip(before, decayed, strict=True):
        explored = (1 + c) * p.grad
        r = explored / (explored.abs() + 1e-6) + 1e-2 * theta
        expected.append(theta.norm() / r.norm())
    ratios = opt.last_trust_ratios
    torch.testing.assert_close(ratios, torch.stack(expected), rtol=1e-12, atol=0)
    # Without a process group, gathering is the local read.
    assert torch.equal(opt.gather_trust_ratios(), ratios)
    train(model, opt, 2, start=1, dtype=torch.float64)
    assert opt.last_trust_ratios.shape == (len(decayed),)
    assert not torch.equal(opt.last_trust_ratios, ratios)  # the latest step's
    # A copy names other tensors: it starts a log of its own.
    assert copy.deepcopy(opt).last_trust_ratios is None
