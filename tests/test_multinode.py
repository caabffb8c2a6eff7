"""Two hosts in one machine: network namespaces joined by a veth pair, one
rank each, started through the launch/ scripts, training together."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dist_harness import free_port

ROOT = Path(__file__).parent.parent
pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None,
        reason="network namespaces need root and iproute2 (CI has both)",
    ),
]
SUBNET = "10.213.7"


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


@pytest.fixture
def hosts():
    """Two namespaces, ADDR.1 and ADDR.2 on a veth pair; removed afterwards."""
    tag = str(os.getpid())[-5:]
    names = [f"edist{tag}a", f"edist{tag}b"]
    links = [f"ved{tag}a", f"ved{tag}b"]
    try:
        for ns in names:
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for i, (ns, link) in enumerate(zip(names, links)):
            sh("ip", "link", "set", link, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", link)
            sh("ip", "-n", ns, "link", "set", link, "up")
        yield list(zip(names, links, [f"{SUBNET}.1", f"{SUBNET}.2"]))
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def run_nodes(hosts, script: str, env_for, args: list[str], timeout: float = 180):
    procs = []
    for i, (ns, link, _) in enumerate(hosts):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": link,
            "PYTHON": sys.executable,
            "DEEPSPEED": str(Path(sys.executable).parent / "deepspeed"),
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            **env_for(i),
        }
        procs.append(
            subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "bash",
                    str(ROOT / "launch" / script),
                    *args,
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1, deadline - time.monotonic()))
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-5000:]
    return outputs


def check_run(run: Path, outputs: list[str]) -> None:
    assert "global batch 8 x 64 tokens" in outputs[0]  # 4 sequences x 2 hosts
    rows = [
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    evals = [r["loss"] for r in rows if r["kind"] == "eval"]
    assert len(evals) == 2 and evals[1] < evals[0], evals


ARGS = ["--preset", "tiny", "--steps", "16", "--micro-batch", "4", "--eval-every", "8",
        "--warmup", "4", "--checkpoint-every", "100", "--no-progress"]  # fmt: skip


def test_torchrun_rendezvous_across_two_hosts(hosts, tmp_path):
    endpoint = f"{hosts[0][2]}:{free_port()}"
    outputs = run_nodes(
        hosts, "torchrun.sh",
        lambda i: {
            "NNODES": "2", "NPROC_PER_NODE": "1", "RDZV_ENDPOINT": endpoint,
            "NODE_RANK": str(i), "LOCAL_ADDR": hosts[i][2],
        },
        ["--backend", "fsdp", "--runs", str(tmp_path), "--name", "fsdp", *ARGS],
    )  # fmt: skip
    check_run(tmp_path / "fsdp", outputs)


def test_deepspeed_launcher_with_a_hostfile_across_two_hosts(hosts, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{addr} slots=1\n" for _, _, addr in hosts))
    port = str(free_port())
    outputs = run_nodes(
        hosts, "deepspeed.sh",
        lambda i: {"HOSTFILE": str(hostfile), "MASTER_ADDR": hosts[0][2],
                   "MASTER_PORT": port, "NODE_RANK": str(i)},
        ["--runs", str(tmp_path), "--name", "ds", *ARGS],
    )  # fmt: skip
    check_run(tmp_path / "ds", outputs)
