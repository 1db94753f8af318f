#!/usr/bin/env bash
# Several JAX processes on this machine, each with its own simulated CPU devices: the same code
# path as a multi-host job, for trying sharding and resumption without a cluster.
#   launch/local_processes.sh 2 4 configs/tiny.yaml data.train_files=[svamp.jsonl] ...
# arguments: number of processes, CPU devices per process, then mcckd-train's arguments.
set -euo pipefail
num_processes=$1; devices=$2; shift 2
port=${MCCKD_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" JAX_PLATFORMS=cpu \
  MCCKD_NUM_PROCESSES=$num_processes MCCKD_PROCESS_ID=$i MCCKD_COORDINATOR=127.0.0.1:$port \
    "${MCCKD_COMMAND:-mcckd-train}" "$@" "mesh.across_hosts=[${num_processes},1,1]" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' INT TERM
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
