"""Crash safety of the main job's checkpoints, on 2 CPU ranks.

Rank 1 is SIGKILLed (through ``E_DIST_FAULT_INJECT``) between two checkpoints
or while one is written. ``latest`` must still name the last complete
checkpoint, and ``--resume`` must end with the same parameters, optimizer
state and metrics as an uninterrupted run, bit for bit. A checkpoint that is
truncated, corrupted or incomplete is refused with a CheckpointError naming
the file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_harness import free_port

from e_dist.checkpoint import io as checkpoint_io
from e_dist.pretrain.train import FAULT_ENV, fault_injection

STEPS, EVERY = 10, 4  # checkpoints at steps 4, 8 and 10
BACKENDS = ["deepspeed", "fsdp"]


def _leftovers(runs: Path) -> list[int]:
    """Kill (SIGKILL) and return the job's processes still running on ``runs``
    (torchrun starts each worker in a session of its own)."""
    needle = b"e_dist.pretrain\0", f"\0{runs}\0".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if all(part in cmdline for part in needle):
            found.append(int(entry.name))
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass
    return found


def launch(
    runs: Path, backend: str, name: str, *extra: str, fault: str | None = None
) -> subprocess.CompletedProcess:
    """The main job on 2 ranks under torchrun; its exit status and output."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "-m", "e_dist.pretrain",
        "--backend", backend, "--preset", "tiny", "--steps", str(STEPS),
        "--warmup", "2", "--eval-every", "5", "--checkpoint-every", str(EVERY),
        "--runs", str(runs), "--name", name, "--no-progress", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(FAULT_ENV, None)
    if fault is not None:
        env[FAULT_ENV] = fault
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its workers on SIGTERM
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"{name} timed out:\n{out[-3000:]}{err[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        leftovers = _leftovers(runs)
    assert not leftovers, f"{name} left processes {leftovers} behind"
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def succeed(runs: Path, backend: str, name: str, *extra: str) -> None:
    done = launch(runs, backend, name, *extra)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def killed(runs: Path, backend: str, name: str, fault: str) -> None:
    """A launch in which rank 1 kills itself: it fails, with rank 1's SIGKILL."""
    done = launch(runs, backend, name, fault=fault)
    assert done.returncode != 0, done.stderr[-3000:]
    assert "rank 1 kills itself" in done.stderr, done.stderr[-5000:]
    assert "SIGKILL" in done.stderr, done.stderr[-5000:]


def metrics(run: Path) -> list[dict]:
    rows = [
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def _flatten(obj, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(value, f"{prefix}/{key}", out)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _flatten(value, f"{prefix}/{i}", out)


def final_state(run: Path, backend: str, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint ``latest`` names: the parameters (bf16
    and fp32 master copies for DeepSpeed) and the optimizer state."""
    checkpoints = run / "checkpoints"
    tag = checkpoint_io.read_latest(checkpoints)
    assert tag == f"step{STEPS:07d}"
    tag_dir = checkpoints / tag
    checkpoint_io.verify(tag_dir)
    tensors: dict[str, torch.Tensor] = {}
    if backend == "deepspeed":
        model = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)
        _flatten(model["module"], "module", tensors)
        for path in sorted(tag_dir.glob("*_optim_states.pt")):
            zero = torch.load(path, weights_only=False)["optimizer_state_dict"]
            _flatten(zero["single_partition_of_fp32_groups"], path.name, tensors)
            _flatten(zero["base_optimizer_state"]["state"], path.name, tensors)
    else:
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        whole = scratch / f"{run.name}.pt"
        dcp_to_torch_save(tag_dir, whole)
        _flatten(torch.load(whole, weights_only=False), "dcp", tensors)
    assert len(tensors) > 10
    return tensors


def assert_bitwise_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        other = got[key]
        assert other.dtype == tensor.dtype and other.shape == tensor.shape, key
        raw = [
            t.detach().reshape(-1).contiguous().view(torch.uint8)
            for t in (other, tensor)
        ]
        assert torch.equal(*raw), f"{key} differs"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted run per backend, made on first use."""
    made: dict[str, Path] = {}

    def get(backend: str) -> Path:
        if backend not in made:
            runs = tmp_path_factory.mktemp(f"uninterrupted_{backend}")
            succeed(runs, backend, "a")
            made[backend] = runs / "a"
        return made[backend]

    return get


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_between_checkpoints_resumes_bitwise(tmp_path, backend, uninterrupted):
    reference = uninterrupted(backend)
    checkpoints = tmp_path / "b" / "checkpoints"

    killed(tmp_path, backend, "b", "kill:rank=1:step=6:point=after_step")
    assert checkpoint_io.read_latest(checkpoints) == "step0000004"
    assert not (checkpoints / "step0000008").exists()

    # Resumed from step 4; --keep-checkpoints 2 then drops step 4.
    succeed(tmp_path, backend, "b", "--resume", "--keep-checkpoints", "2")
    tags = sorted(p.name for p in checkpoints.glob("step*"))
    assert tags == ["step0000008", "step0000010"]
    assert metrics(tmp_path / "b") == metrics(reference)
    assert_bitwise_equal(
        final_state(tmp_path / "b", backend, tmp_path),
        final_state(reference, backend, tmp_path),
    )


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_mid_save_leaves_it_incomplete_and_resumes_bitwise(
    tmp_path, backend, uninterrupted
):
    reference = uninterrupted(backend)
    checkpoints = tmp_path / "c" / "checkpoints"

    killed(tmp_path, backend, "c", "kill:rank=1:step=8:point=mid_save")
    incomplete = checkpoints / "step0000008"
    # Every rank's files were written; DCP's .metadata too, so DCP alone would
    # take it for complete. Only the manifest is missing.
    written = {p.name for p in incomplete.iterdir()}
    if backend == "fsdp":
        assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= written
    else:
        assert "mp_rank_00_model_states.pt" in written
    assert checkpoint_io.MANIFEST not in written
    assert checkpoint_io.read_latest(checkpoints) == "step0000004"
    with pytest.raises(checkpoint_io.CheckpointError, match="incomplete"):
        checkpoint_io.verify(incomplete)

    succeed(tmp_path, backend, "c", "--resume")
    checkpoint_io.verify(incomplete)  # written again, whole
    assert metrics(tmp_path / "c") == metrics(reference)
    assert_bitwise_equal(
        final_state(tmp_path / "c", backend, tmp_path),
        final_state(reference, backend, tmp_path),
    )


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("backend", "damage", "victim", "message"),
    [
        (
            "deepspeed",
            _truncate,
            "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "is truncated or corrupted: ",
        ),
        ("fsdp", _flip_byte, "__1_0.distcp", "is corrupted: its SHA-256 differs"),
        ("fsdp", None, checkpoint_io.MANIFEST, "is incomplete: it has no"),
    ],
    ids=["ds-truncated", "fsdp-flipped-byte", "fsdp-no-manifest"],
)
def test_damaged_latest_checkpoint_is_refused(
    tmp_path, uninterrupted, backend, damage, victim, message
):
    run = tmp_path / "a"
    shutil.copytree(uninterrupted(backend), run)
    tag_dir = run / "checkpoints" / f"step{STEPS:07d}"
    if damage is None:
        (tag_dir / victim).unlink()
    else:
        damage(tag_dir / victim)

    done = launch(tmp_path, backend, "a", "--resume")
    assert done.returncode != 0
    assert "CheckpointError" in done.stderr, done.stderr[-5000:]
    named = str(tag_dir if damage is None else tag_dir / victim)
    assert f"{named} {message}" in done.stderr, done.stderr[-5000:]
    # The others are pointed out, not silently loaded instead.
    assert "Complete checkpoints in" in done.stderr
    assert "step0000004, step0000008; to resume from one of them" in done.stderr
    # Refused before anything was loaded or written.
    assert metrics(run) == metrics(uninterrupted(backend))


def test_commit_covers_hidden_files_but_not_temporary_ones(tmp_path):
    (tmp_path / ".metadata").write_bytes(b"dcp")
    (tmp_path / "__0_0.distcp").write_bytes(b"shard")
    (tmp_path / ".metadata.tmp").write_bytes(b"half")
    (tmp_path / ".x.pt.tmp123").write_bytes(b"half")
    checkpoint_io.commit(tmp_path, {"step": 3})
    manifest = checkpoint_io.verify(tmp_path)
    assert sorted(manifest["files"]) == [".metadata", "__0_0.distcp"]
    assert manifest["step"] == 3
    (tmp_path / ".metadata").write_bytes(b"DCP")
    with pytest.raises(checkpoint_io.CheckpointError, match="SHA-256 differs"):
        checkpoint_io.verify(tmp_path)


@pytest.mark.parametrize(
    ("spec", "rank", "expected"),
    [
        (None, 1, None),
        ("kill:rank=1:step=7:point=after_step", 1, ("after_step", 7)),
        ("kill:rank=1:step=7:point=mid_save", 0, None),
        ("kill:rank=0:step=12:point=mid_save", 0, ("mid_save", 12)),
    ],
)
def test_fault_injection_spec(monkeypatch, spec, rank, expected):
    if spec is None:
        monkeypatch.delenv(FAULT_ENV, raising=False)
    else:
        monkeypatch.setenv(FAULT_ENV, spec)
    assert fault_injection(rank) == expected


@pytest.mark.parametrize(
    "spec",
    ["kill:rank=1:step=7", "stop:rank=1:step=7:point=after_step",
     "kill:rank=1:step=x:point=after_step", "kill:rank=1:step=7:point=mid_step"],
)  # fmt: skip
def test_fault_injection_rejects_bad_specs(monkeypatch, spec):
    monkeypatch.setenv(FAULT_ENV, spec)
    with pytest.raises(ValueError, match="expected 'kill:rank=R:step=S:point=P'"):
        fault_injection(1)
