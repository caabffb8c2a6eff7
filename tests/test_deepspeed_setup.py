"""Installing e_dist into DeepSpeed: versions, missing internals, the runner."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
from dist_harness import free_port

from e_dist import deepspeed as ds_hooks


def test_version_check_warns_once_for_untested_versions(caplog):
    caplog.set_level(logging.WARNING, logger="e_dist")
    assert ds_hooks.check_version("0.19.8")
    assert not ds_hooks.check_version("0.17.2")
    assert not ds_hooks.check_version("0.17.2")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert warnings[0].startswith(
        "e_dist is tested with deepspeed 0.19.x; this is 0.17.2"
    )


def test_a_missing_internal_is_named():
    class Wrapper:
        pass

    with pytest.raises(
        ds_hooks.UnsupportedDeepSpeed, match=r"e_dist needs Wrapper\.bit16_groups"
    ):
        ds_hooks._zero12_pieces(Wrapper())


def test_unknown_wrapper_is_refused():
    class SomeFutureOptimizer:
        pass

    with pytest.raises(
        NotImplementedError, match="does not know DeepSpeed's SomeFutureOptimizer"
    ):
        ds_hooks._piece_map(SomeFutureOptimizer(), object())


def test_stage0_fp16_loss_scaling_is_refused_on_untested_versions(monkeypatch):
    """e_dist scales the loss that deepspeed 0.19 forgets at stage 0 in fp16;
    on a version that may scale it itself, it refuses rather than guess."""

    class FP16_UnfusedOptimizer:  # the name DeepSpeed's wrapper has
        class loss_scale_config:
            use_grad_scaling = True

    class Engine:
        optimizer = FP16_UnfusedOptimizer()

    monkeypatch.setattr(ds_hooks, "_deepspeed_version", lambda: "0.20.0")
    with pytest.raises(
        ds_hooks.UnsupportedDeepSpeed,
        match=r"fp16 at ZeRO stage 0 with ALTO or E: deepspeed 0\.19 does not apply",
    ):
        ds_hooks._scale_loss_at_stage0(Engine())


SCRIPT = textwrap.dedent(
    """
    import argparse, sys
    import deepspeed, torch
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--steps", type=int)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    config = {
        "train_batch_size": 4,
        "optimizer": {"type": "ALTO", "params": {"lr": 1e-2}},
        "zero_optimization": {"stage": 2},
    }
    engine, *_ = deepspeed.initialize(model=model, config=config)
    for _ in range(args.steps):
        loss = engine(torch.randn(4, 8)).square().mean()
        engine.backward(loss)
        engine.step()
    print("OPTIMIZER", type(engine.basic_optimizer).__module__, engine.optimizer_name())
    """
)


@pytest.mark.timeout(120)
def test_runner_serves_an_unchanged_script(tmp_path):
    """The script never imports e_dist; e_dist.run imports it before DeepSpeed."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "e_dist.run",
            "--local_rank=0",
            str(script),
            "--steps",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "OPTIMIZER e_dist.alto ALTO" in done.stdout
