#!/usr/bin/env bash
# One node, N processes (default: one per GPU, or 2 on a CPU machine):
#   launch/single_node.sh configs/quickstart.yaml parallel.dp_shard=2 [key=value ...]
#   NPROC=8 launch/single_node.sh configs/my_run.yaml parallel.tp=2 parallel.dp_shard=4
# The config and its layout are checked before any process starts; exit code 75 means stopped by SIGTERM/SIGUSR1
# with a checkpoint (run it again to continue), 2 a mistake in the config, data or paths (the message says which).
set -uo pipefail
source "$(dirname "$0")/common.sh"
if [ -z "${NPROC:-}" ]; then
  NPROC=$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L | wc -l || echo 2)
fi
check_layout "$NPROC" "$@"
run_torchrun --standalone --nproc_per_node "$NPROC" -m pretrain "${VERB[@]}" "$@"
