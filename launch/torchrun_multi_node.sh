#!/usr/bin/env bash
# Several nodes with a c10d rendezvous: run this same command on every node.
#
#   NNODES=2 NPROC=8 RDZV_HOST=node001 bash launch/torchrun_multi_node.sh configs/ddp-gpt2-small.yaml
#
# RDZV_HOST is any one of the nodes (reachable from all); RDZV_PORT a free port on it;
# RUN_ID must be the same on every node (nodes with different ids wait for each other until the
# rendezvous times out), best new for every job, e.g. your scheduler's job id.
set -euo pipefail
config="${1:?usage: $0 CONFIG.yaml [--key value ...]}"
shift
: "${NNODES:?set NNODES, the number of nodes}"
: "${RDZV_HOST:?set RDZV_HOST, the host of the rendezvous (one of the nodes)}"
NPROC="${NPROC:-8}"
RDZV_PORT="${RDZV_PORT:-29500}"
RUN_ID="${RUN_ID:-distlr}"  # not from the clock: nodes started a minute apart would differ
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" \
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" --rdzv-id="$RUN_ID" \
    -m distlr --config "$config" "$@"
