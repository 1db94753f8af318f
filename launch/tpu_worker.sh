#!/usr/bin/env bash
# One TPU VM worker's part of a pod job: the command with MCCKD_DISTRIBUTED=1 (JAX finds the
# pod's other workers itself), its output also written to DIR/worker-<N>.log with --log_dir.
# launch/tpu_pod.sh runs it on every worker; with the code already there, run it yourself:
#
#   gcloud compute tpus tpu-vm ssh my-tpu --zone us-central2-b --worker=all --command \
#       'cd mcckd_jax && bash launch/tpu_worker.sh --log_dir launch_logs/run1 mcckd-train configs/flan_t5_xl_gsm8k.yaml'
#
# COMMAND is mcckd-train, mcckd-eval or mcckd-teacher with its usual arguments. The repository's
# .venv is used when it has one (tpu_pod.sh installs it there). A single slice needs no mesh
# override; a multi-slice job sets mesh.across_hosts to the number of slices.
# Dry mode: MCCKD_DRY_RUN=1 prints the command line instead of running it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=launch/lib.sh
. "$here/lib.sh"
USAGE="launch/tpu_worker.sh [--log_dir DIR] COMMAND ARGS..."

# The worker's number in the slice (as JAX's TPU cluster detection reads it), else the host name.
worker_id() {
  local id=${TPU_WORKER_ID:-}
  if [ -z "$id" ] && ! is_dry_run; then
    id=$(curl -sf --max-time 5 -H 'Metadata-Flavor: Google' \
        http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number) \
      || id=
  fi
  printf '%s\n' "${id:-$(hostname)}"
}

log_dir=''
while [ $# -gt 0 ]; do
  case $1 in
    --log_dir) [ $# -ge 2 ] || usage_error "--log_dir needs a value"; log_dir=$2; shift 2 ;;
    --log_dir=*) log_dir=${1#*=}; shift ;;
    --) shift; break ;;
    -*) usage_error "unknown flag $1" ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || usage_error "COMMAND is missing"

if [ -d "$here/../.venv/bin" ]; then
  PATH="$(cd "$here/../.venv/bin" && pwd):$PATH"
fi
command=(env MCCKD_DISTRIBUTED=1 "$@")
if [ -z "$log_dir" ]; then
  run_in_place "${command[@]}"
fi
log="$log_dir/worker-$(worker_id).log"
line="$(quote "${command[@]}") 2>&1 | tee $(quote "$log")"
if is_dry_run; then
  show_line "$line"
  exit 0
fi
mkdir -p "$log_dir"
# The log (and the terminal) opens with the command line; the exit status is the command's
# (pipefail).
{ printf '+ %s\n' "$line"; "${command[@]}"; } 2>&1 | tee "$log"
