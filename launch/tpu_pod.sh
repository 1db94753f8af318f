#!/usr/bin/env bash
# A TPU pod slice from your workstation: copies this repository to every worker, installs it
# there, runs the same command on all workers at once (JAX discovers the pod) and brings their
# logs back. Run it from the repository root, where gcloud is set up:
#
#   launch/tpu_pod.sh --tpu my-tpu --zone us-central2-b mcckd-train configs/flan_t5_xl_gsm8k.yaml \
#       student.checkpoint=/mnt/shared/flan-t5-xl 'data.train_files=[/mnt/shared/gsm8k.jsonl]'
#   launch/tpu_pod.sh --tpu my-tpu --zone us-central2-b --skip_install mcckd-eval runs/flan_t5_xl \
#       --test gsm8k=/mnt/shared/gsm8k_test.jsonl
#   launch/tpu_pod.sh --tpu my-tpu --zone us-central2-b --dry_run mcckd-teacher ...   # print only
#
# Steps, each one gcloud command (--dry_run prints them, runs none, needs no gcloud):
#  1. the files git does not ignore (uncommitted edits included) packed into LOGS_DIR and copied
#     to every worker (scp --worker=all);
#  2. on every worker: unpacked into ~/mcckd_jax, a .venv there, `pip install -e '.[tpu]'`;
#  3. on every worker at once: launch/tpu_worker.sh COMMAND ARGS..., which sets
#     MCCKD_DISTRIBUTED=1 and writes ~/mcckd_jax/launch_logs/RUN/worker-<N>.log;
#  4. those logs copied back into LOGS_DIR (default launch_logs/<date-time>, RUN its last
#     component), also when the command failed; the exit status is the command's.
# COMMAND is mcckd-train, mcckd-eval or mcckd-teacher (mcckd-plan runs once, on one machine).
# Outputs (run.output_dir, --output) belong on a disk every worker mounts (NFS, gcsfuse).
#
# Flags: --project P (gcloud's project), --logs_dir DIR, --install_extras LIST (default tpu;
# e.g. tpu,torch-checkpoints), --python PY (makes the .venv; default python3, which must be
# 3.11+), --skip_install (copy only), --skip_copy (run on what the workers have), --dry_run.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=launch/lib.sh
. "$here/lib.sh"
USAGE="launch/tpu_pod.sh --tpu NAME --zone ZONE [FLAGS] COMMAND ARGS...; --help lists the flags"
REMOTE_DIR=mcckd_jax  # on every worker, in the home folder
ARCHIVE=mcckd_jax.tar.gz

tpu='' zone='' project='' logs_dir='' extras=tpu python=python3 copy=1 install=1
while [ $# -gt 0 ]; do
  case $1 in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --tpu | --zone | --project | --logs_dir | --install_extras | --python)
      [ $# -ge 2 ] || usage_error "$1 needs a value" ;;
  esac
  case $1 in
    --tpu) tpu=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --logs_dir) logs_dir=$2; shift 2 ;;
    --install_extras) extras=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --skip_install) install=0; shift ;;
    --skip_copy) copy=0; install=0; shift ;;
    --dry_run) export MCCKD_DRY_RUN=1; shift ;;
    -h | --help) sed -n '2,/^set /{/^#/s/^# \{0,1\}//p;}' "$0"; exit 0 ;;
    --) shift; break ;;
    -*) usage_error "unknown flag $1" ;;
    *) break ;;
  esac
done
[ -n "$tpu" ] || usage_error "--tpu is required"
[ -n "$zone" ] || usage_error "--zone is required"
[ $# -gt 0 ] || usage_error "COMMAND is missing"
case $1 in
  mcckd-train | mcckd-eval | mcckd-teacher) ;;
  *) usage_error "COMMAND must be mcckd-train, mcckd-eval or mcckd-teacher, not $1" ;;
esac

logs_dir=${logs_dir:-launch_logs/$(date +%Y%m%d-%H%M%S)}
logs_dir=${logs_dir%/}
run_name=$(basename "$logs_dir")
tpu_vm=(gcloud compute tpus tpu-vm)
on_all_workers=(--zone "$zone" --worker=all)
if [ -n "$project" ]; then
  on_all_workers+=(--project "$project")
fi

run mkdir -p "$logs_dir"
if ((copy)); then
  if ! is_dry_run && [ -n "$(git -C "$repo" ls-files --deleted)" ]; then
    echo "tpu_pod.sh: tracked files are missing from $repo (git rm or restore them):" \
         "$(git -C "$repo" ls-files --deleted | head -3 | tr '\n' ' ')" >&2
    exit 1
  fi
  # Untracked files that git does not ignore travel too (a new config); launch_logs/ does not.
  list=(git -C "$repo" ls-files -z --cached --others --exclude-standard --exclude=/launch_logs/)
  pack=(tar -czf "$logs_dir/$ARCHIVE" -C "$repo" --null -T -)
  show_line "$(quote "${list[@]}") | $(quote "${pack[@]}")"
  is_dry_run || "${list[@]}" | "${pack[@]}"
  run "${tpu_vm[@]}" scp "$logs_dir/$ARCHIVE" "$tpu:$ARCHIVE" "${on_all_workers[@]}"
  setup="mkdir -p $REMOTE_DIR && tar -xzf $ARCHIVE -C $REMOTE_DIR && rm $ARCHIVE"
  if ((install)); then
    setup+=" && cd $REMOTE_DIR && $(quote "$python") -m venv .venv"
    setup+=" && .venv/bin/pip install --quiet --upgrade pip"
    setup+=" && .venv/bin/pip install --quiet -e $(quote ".[$extras]")"
  fi
  run "${tpu_vm[@]}" ssh "$tpu" "${on_all_workers[@]}" --command "$setup"
fi

work="cd $REMOTE_DIR && bash launch/tpu_worker.sh --log_dir $(quote "launch_logs/$run_name")"
status=0
run "${tpu_vm[@]}" ssh "$tpu" "${on_all_workers[@]}" --command "$work $(quote "$@")" || status=$?
run "${tpu_vm[@]}" scp --recurse "$tpu:$REMOTE_DIR/launch_logs/$run_name" "$(dirname "$logs_dir")" \
    "${on_all_workers[@]}" || echo "tpu_pod.sh: the logs could not all be copied back" >&2
if ! is_dry_run; then
  echo "tpu_pod.sh: logs in $logs_dir (exit status $status)" >&2
fi
exit "$status"
