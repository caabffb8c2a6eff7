"""E behaves as the base optimizer it wraps, with no copy of its state."""

from __future__ import annotations

import pickle

import torch
from models import TinyLM, clone, make_model

import e_dist
from e_dist.update import GRAD_EMA


def backward(model, step=0):
    TinyLM.loss(model, TinyLM.batch(step, torch.float32)).backward()


def test_shares_the_base_containers():
    model = make_model("tiny_lm")
    base = torch.optim.AdamW(model.parameters())
    opt = e_dist.E(base)
    assert opt.param_groups is base.param_groups
    assert opt.state is base.state
    assert opt.defaults is base.defaults
    backward(model)
    opt.step()
    # Adam's lazy initialisation still ran: E's key arrived after it.
    for p in model.parameters():
        assert set(base.state[p]) == {"step", "exp_avg", "exp_avg_sq", GRAD_EMA}
    opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})
    assert len(base.param_groups) == 2


def test_steps_only_the_groups_a_framework_swaps_in():
    """DeepSpeed ZeRO-1/2 steps one group at a time by swapping param_groups."""
    model = make_model("tiny_lm")
    groups = e_dist.weight_decay_groups(model)
    opt = e_dist.E(torch.optim.AdamW(groups, lr=1e-2))
    backward(model)
    all_groups = opt.param_groups
    before = {id(p): p.detach().clone() for p in model.parameters()}
    opt.param_groups = [all_groups[1]]
    opt.step()
    opt.param_groups = all_groups
    stepped = {id(p) for p in all_groups[1]["params"]}
    for p in model.parameters():
        assert torch.equal(p, before[id(p)]) != (id(p) in stepped)
        assert (GRAD_EMA in opt.state[p]) == (id(p) in stepped)


def test_zero_grad_set_to_none():
    model = make_model("tiny_lm")
    opt = e_dist.E(torch.optim.SGD(model.parameters(), lr=0.1))
    backward(model)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_closure_runs_once_with_grad_before_the_transform():
    model = make_model("tiny_lm")
    twin = clone(model)
    opt = e_dist.E(torch.optim.SGD(model.parameters(), lr=0.1), alpha=0.5, beta=0.01)
    twin_opt = e_dist.E(
        torch.optim.SGD(twin.parameters(), lr=0.1), alpha=0.5, beta=0.01
    )
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = TinyLM.loss(model, TinyLM.batch(0, torch.float32))
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [True]
    assert torch.is_tensor(loss)
    backward(twin)
    twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_step_hooks_and_state_dict_hooks():
    model = make_model("tiny_lm")
    opt = e_dist.E(torch.optim.SGD(model.parameters(), lr=0.1))
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(("pre", o)))
    opt.register_step_post_hook(lambda o, a, k: seen.append(("post", o)))
    opt.register_state_dict_post_hook(lambda o, sd: sd.update(marker=1) or sd)
    backward(model)
    opt.step()
    assert seen == [("pre", opt), ("post", opt)]
    assert opt.state_dict()["marker"] == 1


def test_state_dict_carries_the_gradient_ema_and_lr_schedules_apply():
    model = make_model("tiny_lm")
    opt = e_dist.E(torch.optim.AdamW(model.parameters(), lr=1.0))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    backward(model)
    opt.step()
    scheduler.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5
    state = opt.state_dict()["state"]
    assert all(GRAD_EMA in entry for entry in state.values())
    assert len(state) == len(list(model.parameters()))


def test_pickles():
    model = make_model("tiny_lm")
    opt = e_dist.E(torch.optim.SGD(model.parameters(), lr=0.1), alpha=0.5, beta=0.01)
    copy = pickle.loads(pickle.dumps(opt))
    assert copy.alpha == 0.5 and copy.beta == 0.01
    assert len(copy.param_groups[0]["params"]) == len(list(model.parameters()))


def test_noise_and_elementwise_clip():
    param = torch.nn.Parameter(torch.zeros(4))
    opt = e_dist.E(torch.optim.SGD([param], lr=1.0), alpha=0.0, beta=0.5, grad_clip=0.1)
    param.grad = torch.tensor([1.0, -1.0, 0.05, 0.0])
    opt.step()
    assert torch.equal(param.detach(), -torch.tensor([0.1, -0.1, 0.05, 0.0]))
    torch.manual_seed(0)
    noisy = e_dist.E(
        torch.optim.SGD([param], lr=1.0), alpha=0.0, beta=0.5, noise_std=1.0
    )
    param.grad = torch.zeros(4)
    noisy.step()
    assert param.grad.abs().sum() > 0
