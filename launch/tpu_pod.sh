#!/usr/bin/env bash
# A TPU pod slice: run the same command on every worker; JAX discovers the pod itself.
#   gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command \
#     "cd mcckd_jax && launch/tpu_pod.sh configs/flan_t5_xl_gsm8k.yaml student.checkpoint=gs://... ..."
# Multi-slice jobs set mesh.across_hosts to the number of slices. MCCKD_COMMAND=mcckd-eval runs
# the evaluator the same way (its overrides apply to the run's saved config).
set -euo pipefail
export MCCKD_DISTRIBUTED=1
exec "${MCCKD_COMMAND:-mcckd-train}" "$@"
