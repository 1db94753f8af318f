#!/usr/bin/env bash
# Several JAX processes on this machine, each with its own simulated CPU devices: the same code
# path as a multi-host job, for trying sharding and resumption without a cluster.
#
#   launch/local_processes.sh 2 4 configs/tiny.yaml 'data.train_files=[svamp.jsonl]' ...
#
# Arguments: the number of processes, CPU devices per process, then the command's arguments.
# MCCKD_COMMAND (default mcckd-train) picks the command; mcckd-train and mcckd-eval get
# mesh.across_hosts=[PROCESSES,1,1] unless the arguments set it, mcckd-teacher none (it has no
# mesh.* field). MCCKD_PORT fixes the coordinator's port (default: a random one). The exit status
# is the last failing process's. Dry mode: MCCKD_DRY_RUN=1 prints one command line per process.
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "$0")/lib.sh"
USAGE="launch/local_processes.sh PROCESSES DEVICES ARGS..."

[ $# -ge 2 ] || usage_error "PROCESSES and DEVICES are required"
num_processes=$1 devices=$2
shift 2
is_count "$num_processes" || usage_error "PROCESSES must be a positive integer, not $num_processes"
is_count "$devices" || usage_error "DEVICES must be a positive integer, not $devices"
command=("${MCCKD_COMMAND:-mcckd-train}" "$@")
if needs_mesh_override "${command[@]}"; then
  command+=("mesh.across_hosts=[$num_processes,1,1]")
fi
port=${MCCKD_PORT:-$((20000 + RANDOM % 20000))}

pids=()
for ((i = 0; i < num_processes; i++)); do
  process=(env "XLA_FLAGS=--xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu
           MCCKD_NUM_PROCESSES="$num_processes" MCCKD_PROCESS_ID="$i"
           MCCKD_COORDINATOR="127.0.0.1:$port" "${command[@]}")
  show_line "$(quote "${process[@]}") &"
  if ! is_dry_run; then
    "${process[@]}" &
    pids+=("$!")
  fi
done
if is_dry_run; then
  exit 0
fi
trap 'kill -TERM "${pids[@]}" 2>/dev/null' INT TERM
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
