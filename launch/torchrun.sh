#!/usr/bin/env bash
# Multi-node pretraining with torchrun and c10d rendezvous. Run it on every
# node with the same RDZV_ENDPOINT (host:port of one node):
#
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0:29500 launch/torchrun.sh \
#       --backend fsdp --optimizer ALTO --preset gpt2 --micro-batch 16 ...
#
# torchrun guesses which node hosts the rendezvous, and each node's address,
# from host names; where that fails (containers, network namespaces), give each
# node NODE_RANK (0 hosts the rendezvous; under SLURM, SLURM_NODEID serves)
# and LOCAL_ADDR, its address that the others reach.
#
# Arguments after the script go to `python -m e_dist.pretrain`.
set -euo pipefail
: "${NNODES:?set NNODES, the number of nodes}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT, host:port of the rendezvous (any one node)}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
RDZV_ID="${RDZV_ID:-e_dist}"
PYTHON="${PYTHON:-python}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-}}"
host=()
if [[ -n "$NODE_RANK" ]]; then
    host=(--rdzv_conf "is_host=$([[ "$NODE_RANK" == 0 ]] && echo 1 || echo 0)")
fi
if [[ -n "${LOCAL_ADDR:-}" ]]; then
    host+=(--local_addr "$LOCAL_ADDR")
fi
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "$RDZV_ID" \
    "${host[@]}" -m e_dist.pretrain "$@"
