#!/usr/bin/env bash
# The deepspeed launcher (one node, or several through a hostfile) running distlr as a module.
#
#   bash launch/deepspeed.sh configs/zero3.yaml [--key value ...]
#   NUM_GPUS=8 HOSTFILE=hostfile bash launch/deepspeed.sh configs/zero2.yaml --model gpt2-small
set -euo pipefail
config="${1:?usage: $0 CONFIG.yaml [--key value ...]}"
shift
args=(--num_gpus="${NUM_GPUS:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}")
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile="$HOSTFILE")
exec deepspeed "${args[@]}" --module distlr --config "$config" "$@"
