"""What the benchmarks share: starting their own ranks on this machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def launch(script: str, argv: list[str], world: int) -> None:
    """Run ``script`` on ``world`` local ranks (gloo, one thread each) and wait.

    Each rank gets the usual torch.distributed environment; the script then
    finds RANK set and does the work.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(subprocess.Popen([sys.executable, script, *argv], env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"ranks exited with {codes}")
