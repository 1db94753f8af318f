#!/usr/bin/env bash
# One process per GPU host (all local GPUs in each process), e.g. from SLURM or a job runner
# that starts this script on every host with NODE_RANK / NUM_NODES / MASTER_ADDR set.
#   NUM_NODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/gpu_multihost.sh configs/llama7b_lora_gsm8k.yaml \
#       student.checkpoint=/data/llama-7b data.train_files=[/data/gsm8k.jsonl]
# The mesh's across_hosts must multiply to NUM_NODES (here: data parallel across hosts).
# MCCKD_COMMAND=mcckd-eval evaluates a run on the same hosts.
set -euo pipefail
: "${NUM_NODES:?set NUM_NODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
export MCCKD_NUM_PROCESSES=$NUM_NODES MCCKD_PROCESS_ID=$NODE_RANK
export MCCKD_COORDINATOR="${MASTER_ADDR}:${MASTER_PORT:-12355}"
# Let XLA use most of each GPU's memory, leaving room for NCCL and cuDNN workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec "${MCCKD_COMMAND:-mcckd-train}" "$@" "mesh.across_hosts=[${NUM_NODES},1,1]"
