#!/usr/bin/env bash
# Multi-node pretraining with the deepspeed launcher and a hostfile
# ("HOST slots=N" per line).
#
# From node 0, reaching the others over ssh (pdsh):
#   HOSTFILE=hostfile MASTER_ADDR=node0 launch/deepspeed.sh --optimizer ALTO ...
# Without ssh, on every node with its own NODE_RANK (0 .. nodes - 1):
#   HOSTFILE=hostfile MASTER_ADDR=node0 NODE_RANK=1 launch/deepspeed.sh ...
#
# Arguments after the script go to `python -m e_dist.pretrain --backend deepspeed`.
set -euo pipefail
: "${HOSTFILE:?set HOSTFILE, lines of 'HOST slots=N'}"
: "${MASTER_ADDR:?set MASTER_ADDR, the address of the first host}"
MASTER_PORT="${MASTER_PORT:-29500}"
DEEPSPEED="${DEEPSPEED:-deepspeed}"
node=()
if [[ -n "${NODE_RANK:-}" ]]; then
    node=(--no_ssh --node_rank "$NODE_RANK")
fi
exec "$DEEPSPEED" --hostfile "$HOSTFILE" "${node[@]}" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --module e_dist.pretrain --backend deepspeed "$@"
