"""Checkpoints across world sizes, ZeRO stages and backends, over gloo on CPU.

A run at 2 ranks trains 3 steps, saves, and goes on uninterrupted, keeping
snapshots of the whole parameters and optimizer state (``grad_ema``
included). The checkpoint is converted (universal, consolidated) and loaded
at 1 and 3 ranks into another stage or backend, by a model that starts from
other weights: the loaded state must equal the saved one bitwise, and 5
steps later it must match the uninterrupted run.

Tolerance of the 5 steps: every rank feeds the same batch, so the averaged
gradient is the single-process one, exactly at 1 and 2 ranks and rounded
at 3 (g + g + g); piece norms add up in another order; FSDP2 clips in ALTO
where DeepSpeed clips in the engine. As in the parity tests (measured below
6e-7 after 10 steps), the bounds are 1e-6 on parameters, 5e-6 on state.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import dist_harness
import pytest

from e_dist.checkpoint.__main__ import main as checkpoint_cli

pytestmark = pytest.mark.timeout(900)
PARAM_BOUND, STATE_BOUND = 1e-6, 5e-6
STEPS, MORE = 3, 5
DECAYS = [1e-4, 0.0, 1e-4]  # straddle_groups: each group keeps its own


def ds(world: int, scenario: str, **args) -> list[dict]:
    return dist_harness.results("ds_worker.py", world, scenario, 400, **args)


def fsdp(world: int, scenario: str, **args) -> list[dict]:
    return dist_harness.results("fsdp_worker.py", world, scenario, 400, **args)


def check_loaded(row: dict, steps: int = STEPS) -> None:
    print("measured", row)  # shown with pytest -s
    assert row["loaded_bitwise"], row
    assert row["steps_loaded"] == [steps], row
    assert row["param_error"] <= PARAM_BOUND, row
    assert row["state_error"] <= STATE_BOUND, row


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory) -> Path:
    """ZeRO-1, 2 and 3 checkpoints at 2 ranks, ALTO and E over AdamW; ALTO
    under BF16_Optimizer (ZeRO-1, bf16)."""
    directory = tmp_path_factory.mktemp("zero")
    common = dict(steps=STEPS, more=MORE, dir=str(directory))
    ds(2, "universal_save", stages=[1, 2, 3], optimizers=["ALTO", "EAdamW"], **common)
    (row,) = ds(
        2, "universal_save", stages=[1], optimizers=["ALTO"], precision="bf16",
        **common,
    )  # fmt: skip
    assert row["wrapper"] == "BF16_Optimizer", row
    return directory


def test_universal_checkpoint_at_other_world_sizes_and_stages(zero_runs):
    """ZeRO-2 -> ZeRO-2, ZeRO-2 -> ZeRO-3, ZeRO-3 -> ZeRO-1, ZeRO-1 -> ZeRO-2,
    at 1 and 3 ranks."""
    cases = []
    for name in ("ALTO", "EAdamW"):
        for source, target in ((2, 2), (2, 3), (3, 1), (1, 2)):
            run = zero_runs / f"{name}-z{source}"
            universal = zero_runs / f"{name}-z{source}-universal"
            if not universal.exists():
                assert (
                    checkpoint_cli(["universal", str(run / "t"), str(universal / "t")])
                    == 0
                )
            cases.append(
                {
                    "label": f"{name} zero-{source} -> zero-{target}",
                    "optimizer": name, "stage": target,
                    "universal": str(universal), "snapshots": f"{run}-snapshots.pt",
                }
            )  # fmt: skip
    for world in (1, 3):
        rows = ds(world, "universal_load", cases=cases, steps=STEPS, more=MORE)
        assert len(rows) == len(cases)
        for row in rows:
            check_loaded(row)
            assert row["weight_decays"] == DECAYS, row
            assert row["global_steps"] == STEPS + MORE, row


def test_universal_checkpoint_in_bf16(zero_runs):
    """BF16_Optimizer (ZeRO-1, bf16) at 2 ranks -> ZeRO-3 bf16 at 3 ranks:
    the fp32 master weights and the state load bitwise. The next steps are
    not compared: bf16 gradients averaged over 3 ranks round differently."""
    run = zero_runs / "ALTO-z1-bf16"
    universal = zero_runs / "ALTO-z1-bf16-universal"
    assert checkpoint_cli(["universal", str(run / "t"), str(universal / "t")]) == 0
    case = {
        "label": "ALTO bf16 zero-1 -> zero-3", "optimizer": "ALTO", "stage": 3,
        "precision": "bf16", "universal": str(universal),
        "snapshots": f"{run}-snapshots.pt",
    }  # fmt: skip
    (row,) = ds(3, "universal_load", cases=[case], steps=STEPS, more=MORE)
    print("measured", row)
    assert row["loaded_bitwise"] and row["steps_loaded"] == [STEPS], row
    assert row["wrapper"] == "DeepSpeedZeroOptimizer_Stage3", row
    assert row["weight_decays"] == DECAYS, row


def test_deepspeed_to_fsdp2_and_back_through_a_consolidated_file(zero_runs, tmp_path):
    """ZeRO-2 at 2 ranks -> one file -> FSDP2 at 1 and 3 ranks, 5 steps; the
    file FSDP2 writes at 3 ranks -> DeepSpeed ZeRO-2 at 1 and 3 ranks, 5 more
    steps, against the uninterrupted DeepSpeed run."""
    back_cases = []
    for name in ("ALTO", "EAdamW"):
        run = zero_runs / f"{name}-z2"
        snapshots = f"{run}-snapshots.pt"
        file = tmp_path / f"{name}-from-deepspeed.pt"
        assert checkpoint_cli(["consolidate", str(run / "t"), str(file)]) == 0
        for world in (1, 3):
            back = tmp_path / f"{name}-from-fsdp{world}.pt"
            (row,) = fsdp(
                world, "from_consolidated", optimizer=name, file=str(file),
                snapshots=snapshots, out=str(back), steps=STEPS, more=MORE, clip=0.05,
            )  # fmt: skip
            check_loaded(row)
            assert row["weight_decays"] == DECAYS, row
        universal = tmp_path / f"{name}-from-fsdp3-universal"
        assert checkpoint_cli(["universal", str(back), str(universal / "t")]) == 0
        back_cases.append(
            {
                "label": f"{name} fsdp2 -> zero-2", "optimizer": name, "stage": 2,
                "universal": str(universal), "snapshots": snapshots,
                "expected_file": str(back), "start": STEPS + MORE, "after": "end",
            }
        )  # fmt: skip
    for world in (1, 3):
        rows = ds(world, "universal_load", cases=back_cases, steps=STEPS, more=MORE)
        assert len(rows) == len(back_cases)
        for row in rows:
            check_loaded(row, steps=STEPS + MORE)
            assert row["weight_decays"] == DECAYS, row


def test_universal_checkpoint_of_another_optimizer_or_incomplete_is_refused(
    zero_runs, tmp_path
):
    """Nothing changes in the live engine: not the weights, the state or the
    step counters that DeepSpeed sets before the optimizer loads."""
    alto = zero_runs / "ALTO-z2"
    universal = tmp_path / "alto-universal"
    assert checkpoint_cli(["universal", str(alto / "t"), str(universal / "t")]) == 0
    incomplete = tmp_path / "incomplete"
    shutil.copytree(universal, incomplete)
    (incomplete / "t" / "e_dist_complete.json").unlink()
    cases = [
        {"label": "other", "optimizer": "EAdamW", "dir": str(universal)},
        {"label": "incomplete", "optimizer": "ALTO", "dir": str(incomplete)},
    ]
    rows = {row["case"]: row for row in ds(1, "refused", cases=cases)}
    assert rows["other"]["unchanged"] and rows["incomplete"]["unchanged"], rows
    assert (
        "holds the state of ALTO, but the optimizer it is loaded into is E over "
        "AdamW; nothing was loaded" in rows["other"]["error"]
    ), rows
    assert (
        "is incomplete: it has no e_dist_complete.json" in rows["incomplete"]["error"]
    ), rows


def test_deepspeed_checkpoint_that_cannot_load_whole_is_refused(zero_runs, tmp_path):
    """engine.load_checkpoint of DeepSpeed's own format: DeepSpeed loads the
    module's weights and its counters before the optimizer's state, so every
    rank checks the files it will read first, and all ranks refuse together
    (a damaged file on rank 1 stops rank 0 too)."""
    alto, damaged = zero_runs / "ALTO-z2", tmp_path / "damaged"
    shutil.copytree(alto, damaged)
    rank1 = damaged / "t" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    rank1.write_bytes(rank1.read_bytes()[:-100])
    native = {"universal": False}
    cases = [
        {"label": "other", "optimizer": "ALTO", "dir": str(zero_runs / "EAdamW-z2")},
        {
            "label": "other z3", "optimizer": "EAdamW", "stage": 3,
            "dir": str(zero_runs / "ALTO-z3"),
        },
        {"label": "stage", "optimizer": "ALTO", "stage": 3, "dir": str(alto)},
        {"label": "stage 0", "optimizer": "ALTO", "stage": 0, "dir": str(alto)},
        {"label": "damaged", "optimizer": "ALTO", "dir": str(damaged)},
    ]  # fmt: skip
    rows = {r["case"]: r for r in ds(2, "refused", cases=[c | native for c in cases])}
    (world,) = ds(
        1, "refused",
        cases=[{"label": "world", "optimizer": "ALTO", "dir": str(damaged)} | native],
    )  # fmt: skip
    rows["world"] = world
    for row in rows.values():
        print("measured", row)
        assert row["unchanged"], row
        assert row["error"].endswith("; nothing was loaded"), row
    assert (
        "expected ALTO's state (three betas and alpha in every param group), found "
        "E's state over an optimizer with hyperparameters betas, eps, lr, "
        "weight_decay" in rows["other"]["error"]
    ), rows["other"]
    assert (
        "expected E's state over AdamW, found ALTO's state" in rows["other z3"]["error"]
    ), rows["other z3"]
    assert (
        "has no zero_pp_rank_0_mp_rank_00_model_states.pt, which this engine (ZeRO "
        "stage 3) reads; it holds ['mp_rank_00_model_states.pt']. Convert it with "
        "`python -m e_dist.checkpoint universal" in rows["stage"]["error"]
    ), rows["stage"]
    assert (
        "holds no optimizer state, which a ZeRO stage 0 engine reads from it (a "
        "ZeRO checkpoint: zero_pp_rank_0_mp_rank_00_optim_states.pt"
        in rows["stage 0"]["error"]
    ), rows["stage 0"]
    assert rows["damaged"]["error"].startswith("rank 1 refused the checkpoint: "), rows[
        "damaged"
    ]
    assert (
        "zero_pp_rank_1_mp_rank_00_optim_states.pt is truncated or corrupted"
        in rows["damaged"]["error"]
    ), rows["damaged"]
    assert (
        "was saved at 2 data-parallel ranks and this engine has 1; DeepSpeed loads "
        "ZeRO optimizer state only at the world size it was saved at. Convert it"
        in rows["world"]["error"]
    ), rows["world"]
