"""The CPU kernels against the readable reference path.

Both compute the same operations; the kernels multiply by reciprocal bias
corrections where the reference divides, and keep bfloat16 values in float32
between operations where the reference rounds after each. Bounds: float64
1e-12 relative after 50 steps, float32 1e-5, bfloat16 5e-2 (a few units in
bfloat16's last place, 2**-8 = 3.9e-3, after amplification).
"""

from __future__ import annotations

import pytest
import torch
from models import clone, make_model, max_rel_error, train

import e_dist
from e_dist import native, update

pytestmark = pytest.mark.skipif(
    native.cpu_kernels() is None, reason="the CPU kernels failed to build"
)
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2}


def test_kernels_build_here():
    # The skip above must never hide a build failure on the machines we test on.
    assert native.cpu_kernels() is not None


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
@pytest.mark.parametrize("adaptation", ["reference", "paper", "none"])
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str
)
def test_native_matches_reference_over_50_steps(dtype, adaptation, max_grad_norm):
    model = make_model("tiny_lm", dtype)
    twin = clone(model)
    kwargs = dict(lr=1e-2, adaptation=adaptation, max_grad_norm=max_grad_norm)
    fast = e_dist.ALTO(
        e_dist.weight_decay_groups(model), implementation="native", **kwargs
    )
    slow = e_dist.ALTO(
        e_dist.weight_decay_groups(twin), implementation="reference", **kwargs
    )
    train(model, fast, 50, dtype=dtype)
    train(twin, slow, 50, dtype=dtype)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert max_rel_error(p, q) <= TOLERANCE[dtype], name
        for key in ("exp_avg", "exp_avg_sq", "grad_ema"):
            err = max_rel_error(fast.state[p][key], slow.state[q][key])
            assert err <= TOLERANCE[dtype] * 10, (name, key, err)


def random_tensors(numel, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(numel, generator=gen, dtype=torch.float64).to(dtype)
        for _ in range(5)
    ]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_segmented_tensors(dtype):
    """Several segments per tensor, empty ones and one over a chunk boundary."""
    sizes = [100_000, 7, 0, 3]
    offsets = [[0, 5, 5, 40_000, 100_000], [0, 7], [0, 0], [0, 0, 3]]
    fast = [random_tensors(n, dtype, i) for i, n in enumerate(sizes)]
    slow = [[t.clone() for t in ts] for ts in fast]
    for ts in (fast, slow):
        for t in ts:
            t[3].abs_()  # exp_avg_sq starts non-negative
            t[4].abs_()
    h = update.Moments(-0.05, 0.99, 0.9, 0.99, 1 - 0.9**3, 1 - 0.99**3, 1e-6, 1e-4)
    scale = torch.tensor(0.5, dtype=torch.float64)

    def columns(ts):
        p, g, mu, m, v = zip(*ts)
        return p, g, mu, m, v

    sums = {}
    for name, ts, impl in (("fast", fast, "native"), ("slow", slow, "reference")):
        p, g, mu, m, v = columns(ts)
        sums[name] = update.advance(p, g, mu, m, v, offsets, scale, h, None, impl)
        step_sizes = torch.linspace(
            1e-3, 2e-3, sums[name].shape[0], dtype=torch.float64
        )
        update.apply(p, m, v, offsets, step_sizes, h, impl)
        sums[name + "_sq"] = update.segment_sq_sums(g, offsets, impl)
    assert sums["fast"].shape == (8, 2)
    assert torch.allclose(
        sums["fast"], sums["slow"], rtol=1e-6 if dtype == torch.float32 else 1e-12
    )
    assert torch.allclose(sums["fast_sq"], sums["slow_sq"], rtol=1e-12)
    for a, b in zip(fast, slow):
        for x, y in zip(a, b):
            assert max_rel_error(x, y) <= TOLERANCE[dtype]


def test_native_rejects_what_it_cannot_take():
    model = make_model("tiny_lm")
    opt = e_dist.ALTO(model.parameters(), implementation="native")
    model.embed.weight.grad = torch.zeros(16, 37).t()  # not contiguous
    with pytest.raises(ValueError, match="contiguous CPU tensors"):
        opt.step()
