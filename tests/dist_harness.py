"""Start real worker processes over gloo, one per rank, and wait for them.

Each worker is ``python WORKER ARGS`` with the usual torch.distributed
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Workers
run in their own session, so a timeout kills them and everything they
started; nothing is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(
    worker: str, world_size: int, args: list[str], timeout: float
) -> list[str]:
    """Run ``tests/<worker>`` on ``world_size`` ranks; return each rank's output.

    Fails (with every rank's output) if any rank exits non-zero or the
    deadline passes.
    """
    port = free_port()
    logs, procs = [], []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(
                [str(TESTS), os.environ.get("PYTHONPATH", "")]
            ),
        }
        log = tempfile.TemporaryFile(mode="w+")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(TESTS / worker), *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        timed_out = any(p.poll() is None for p in procs)
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if timed_out or failed:
        text = "\n".join(
            f"--- rank {r} ---\n{out[-6000:]}" for r, out in enumerate(outputs)
        )
        reason = (
            f"timed out after {timeout}s" if timed_out else f"ranks {failed} failed"
        )
        raise AssertionError(f"{worker} {args} on {world_size} ranks {reason}\n{text}")
    return outputs


def results(
    worker: str, world: int, scenario: str, timeout: float, **args
) -> list[dict]:
    """Run ``scenario`` of ``worker``; rank 0's ``RESULT {json}`` rows."""
    outputs = run_workers(worker, world, [scenario, json.dumps(args)], timeout)
    lines = [line for line in outputs[0].splitlines() if line.startswith("RESULT ")]
    return [json.loads(line[len("RESULT ") :]) for line in lines]


COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "broadcast",
    "reduce_scatter_tensor", "reduce", "all_to_all_single", "barrier",
)  # fmt: skip


class CollectiveCounter:
    """Counts torch.distributed collectives issued while ``inside`` is set.

    Each function is wrapped, not replaced: the collective still runs.
    """

    def __init__(self) -> None:
        import torch.distributed as dist

        self.inside = False
        self.counts = dict.fromkeys(COLLECTIVES, 0)
        for name in COLLECTIVES:
            original = getattr(dist, name)

            def counting(*args, _original=original, _name=name, **kwargs):
                if self.inside:
                    self.counts[_name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counting)

    def reset(self) -> None:
        self.counts = dict.fromkeys(COLLECTIVES, 0)


def report(**fields) -> None:
    """A worker's result: one ``RESULT {json}`` line, from rank 0 only."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(fields), flush=True)


def worker_main(scenarios: dict, init_process_group) -> None:
    """A worker's entry: ``WORKER SCENARIO JSON_ARGS``; ends the process
    without interpreter teardown (DeepSpeed engines sometimes abort in it)."""
    import torch
    import torch.distributed as dist

    scenario, args = sys.argv[1], json.loads(sys.argv[2])
    init_process_group()
    torch.set_num_threads(1)
    scenarios[scenario](args)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
