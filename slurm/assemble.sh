#!/usr/bin/env bash
# An assembled run (assembly: section) as SLURM jobs, each an ordinary slurm/train.sbatch job (preemption-safe,
# requeued, resumed): the meta model; the K incubations as a job array that starts when the meta job succeeded
# (array index = module); the join when every incubation succeeded. Run it on the login node:
#
#   slurm/assemble.sh configs/my_assembled.yaml [key=value ...]
#
# sbatch options per phase (nodes, GPUs, time, partition...) in META_SBATCH, INCUBATE_SBATCH and JOIN_SBATCH, e.g.
#   INCUBATE_SBATCH="--nodes 1 --gpus-per-node 8 --time 12:00:00" slurm/assemble.sh CONFIG
# Submitting again continues: finished phases end at once, an interrupted one resumes from its checkpoint.
# Environment as slurm/train.sbatch (PYTHON, NPROC_PER_NODE, MASTER_PORT).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: slurm/assemble.sh CONFIG [key=value ...]" >&2; exit 2; }
[ -f slurm/train.sbatch ] || { echo "slurm/assemble.sh: run it from the repository root" >&2; exit 2; }
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  [ -x .venv/bin/python ] && PYTHON=$PWD/.venv/bin/python
fi
export PYTHON
# Checked here, before anything is queued: every phase's config (a config without assembly.modules stops here).
K=$("$PYTHON" -m pretrain assemble check "$@") || exit 2

submit() {  # PHASE SBATCH_OPTIONS... -- CONFIG ARGS...
  local phase=$1
  shift
  PRETRAIN_VERB="assemble $phase" sbatch --parsable --job-name "pretrain-$phase" "$@" | cut -d';' -f1
}
# shellcheck disable=SC2086  # the *_SBATCH variables are lists of options
meta=$(submit meta ${META_SBATCH:-} slurm/train.sbatch "$@")
# shellcheck disable=SC2086
incubate=$(submit incubate --dependency "afterok:$meta" --array "1-$K" ${INCUBATE_SBATCH:-} slurm/train.sbatch "$@")
# shellcheck disable=SC2086
join=$(submit join --dependency "afterok:$incubate" ${JOIN_SBATCH:-} slurm/train.sbatch "$@")
echo "meta model: job $meta; incubations: job array $incubate (modules 1-$K, after $meta); join: job $join (after the array)"
