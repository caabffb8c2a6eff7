"""Two hosts in one machine: network namespaces joined by a veth pair, one
rank each, started through the launch/ scripts, training together.

The SLURM test runs launch/slurm.sbatch as sbatch would on the first node,
with stand-ins for SLURM's own commands (no SLURM here): ``scontrol show
hostnames`` names the two hosts, ``srun`` starts the task once per host, in
its namespace, with the SLURM_* variables a node's task sees."""

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


# What srun does for one job step with one task per node: the command once per
# node, with that node's SLURM variables; it fails if any task fails. Each node
# is a namespace here; LOCAL_ADDR and GLOO_SOCKET_IFNAME stand for what its
# own host name would give.
FAKE_SRUN = """#!/usr/bin/env bash
set -u
while [[ "${1:-}" == --* ]]; do shift; done
IFS=';' read -ra nodes <<< "$TEST_NODES"
pids=()
for i in "${!nodes[@]}"; do
    IFS=',' read -r ns link addr <<< "${nodes[$i]}"
    SLURM_NODEID=$i SLURM_PROCID=$i GLOO_SOCKET_IFNAME=$link LOCAL_ADDR=$addr \
        ip netns exec "$ns" "$@" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
exit $rc
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] || exit 2
tr ';' '\\n' <<< "$TEST_ADDRS"
"""


def test_slurm_batch_script_across_two_hosts(hosts, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHON": sys.executable,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(ROOT),
        "MASTER_PORT": str(free_port()),
        "TEST_NODES": ";".join(",".join(host) for host in hosts),
        "TEST_ADDRS": ";".join(addr for _, _, addr in hosts),
    }  # fmt: skip
    env.pop("NPROC_PER_NODE", None)  # found from the GPUs: none, so 1
    proc = subprocess.Popen(
        ["bash", str(ROOT / "launch" / "slurm.sbatch"), "--backend", "fsdp",
         "--runs", str(tmp_path), "--name", "slurm", *ARGS],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-5000:]
    assert "error" not in out.split("global batch")[0].lower(), out[-5000:]
    check_run(tmp_path / "slurm", [out])
