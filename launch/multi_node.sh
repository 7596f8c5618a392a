#!/usr/bin/env bash
# Several nodes with c10d rendezvous: run this once per node (SLURM's srun does it for you, see
# slurm/train.sbatch). Under SLURM the node count, rank and rendezvous host come from the allocation;
# elsewhere set NNODES and MASTER_ADDR (the first node's address) yourself.
#   NNODES=2 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 launch/multi_node.sh CONFIG [key=value ...]
# Checked before any process starts; exit codes as launch/single_node.sh (75: preempted, 2: a user mistake).
set -uo pipefail
source "$(dirname "$0")/common.sh"
if [ -n "${SLURM_JOB_ID:-}" ]; then
  NNODES=${NNODES:-$SLURM_NNODES}
  MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
  RDZV_ID=${RDZV_ID:-$SLURM_JOB_ID}
fi
: "${NNODES:?set NNODES (number of nodes)}" "${MASTER_ADDR:?set MASTER_ADDR (the first node)}"
NPROC_PER_NODE=${NPROC_PER_NODE:-$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L | wc -l || echo 1)}
MASTER_PORT=${MASTER_PORT:-29500}
check_layout "$((NNODES * NPROC_PER_NODE))" "$@"
run_torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${RDZV_ID:-pretrain}" \
  -m pretrain "${VERB[@]}" "$@"
