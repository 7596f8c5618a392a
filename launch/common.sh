# Shared by launch/single_node.sh and launch/multi_node.sh (sourced, not run):
#   pretrain_config ARGS...          the run's config (`pretrain config ARGS`, or the assembly phase's)
#   check_layout WORLD_SIZE ARGS...  validate the config and its layout against WORLD_SIZE processes before any
#                                    process starts (exit 2 with the message, as `pretrain train` would)
#   run_torchrun ARGS...             torchrun with pretrain train, forwarding SIGUSR1 (SLURM's warning) and SIGTERM to
#                                    the workers, which checkpoint and stop; exits 75 when they did (preempted), 2 when
#                                    the run stopped on a user error, else torchrun's own status
# PRETRAIN_VERB is what the processes run: `train` (default), or a phase of an assembled run such as
# `assemble incubate` (slurm/assemble.sh sets it; the module of an incubation is the SLURM array index).
PYTHON=${PYTHON:-python3}
read -ra VERB <<< "${PRETRAIN_VERB:-train}"

pretrain_config() {
  if [ "${VERB[0]}" = train ]; then "$PYTHON" -m pretrain config "$@"; else "$PYTHON" -m pretrain "${VERB[@]}" "$@"; fi
}

check_layout() {
  local world=$1
  shift
  RUN_DIR=$(pretrain_config "$@" --world-size "$world" --get train.run_dir) || exit 2
}

run_torchrun() {
  local status=0
  "$PYTHON" -m torch.distributed.run --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout "${SHUTDOWN_TIMEOUT:-300}" "$@" &
  local pid=$!
  trap 'kill -USR1 $pid' USR1
  trap 'kill -TERM $pid' TERM
  wait $pid || status=$?
  while kill -0 $pid 2>/dev/null; do wait $pid || status=$?; done  # a trapped signal interrupts wait
  if [ -f "$RUN_DIR/preempted" ]; then exit 75; fi
  if [ -f "$RUN_DIR/user_error" ]; then exit 2; fi
  exit $status
}
