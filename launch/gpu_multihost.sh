#!/usr/bin/env bash
# One process per GPU host (all local GPUs in each process), started on every host by a job
# runner that sets NODE_RANK / NUM_NODES / MASTER_ADDR (SLURM: launch/slurm_gpu.sbatch instead):
#
#   NUM_NODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/gpu_multihost.sh configs/llama7b_lora_gsm8k.yaml \
#       student.checkpoint=/data/llama-7b 'data.train_files=[/data/gsm8k.jsonl]'
#
# mcckd-train and mcckd-eval get mesh.across_hosts=[NUM_NODES,1,1] (data parallel across hosts)
# unless the arguments set it. MCCKD_COMMAND=mcckd-eval evaluates a run on the same hosts,
# MCCKD_COMMAND=mcckd-teacher samples a local teacher on them (no mesh override: it has none).
# MASTER_PORT defaults to 12355. Dry mode: MCCKD_DRY_RUN=1 prints the command line instead.
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "$0")/lib.sh"
USAGE="NUM_NODES=N NODE_RANK=I MASTER_ADDR=HOST [MCCKD_COMMAND=...] launch/gpu_multihost.sh ARGS..."

for name in NUM_NODES NODE_RANK MASTER_ADDR; do
  [ -n "${!name:-}" ] || usage_error "$name is not set"
done
is_count "$NUM_NODES" || usage_error "NUM_NODES must be a positive integer, not $NUM_NODES"
command=("${MCCKD_COMMAND:-mcckd-train}" "$@")
if needs_mesh_override "${command[@]}"; then
  command+=("mesh.across_hosts=[$NUM_NODES,1,1]")
fi
# XLA takes most of each GPU's memory, leaving room for NCCL and cuDNN workspaces.
run_in_place env MCCKD_NUM_PROCESSES="$NUM_NODES" MCCKD_PROCESS_ID="$NODE_RANK" \
    MCCKD_COORDINATOR="$MASTER_ADDR:${MASTER_PORT:-12355}" \
    XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}" "${command[@]}"
