#!/usr/bin/env bash
# One node, all its GPUs (or NPROC processes): every rank runs the range test on its own shard.
#
#   bash launch/torchrun_single_node.sh configs/ddp-gpt2-small.yaml [--key value ...]
#   NPROC=2 bash launch/torchrun_single_node.sh configs/demo-ddp.yaml      # CPU, 2 processes
set -euo pipefail
config="${1:?usage: $0 CONFIG.yaml [--key value ...]}"
shift
if [ -z "${NPROC:-}" ]; then
    NPROC=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
exec torchrun --standalone --nproc_per_node="$NPROC" -m distlr --config "$config" "$@"
