# shellcheck shell=bash
# What the launch scripts share (sourced, not run): printing a command so that it can be copied
# and run, the dry mode (MCCKD_DRY_RUN=1: print every command, run none), the one-line usage
# error, and the mesh override of multi-process mcckd-train / mcckd-eval runs.
# Kept to bash 3.2 (macOS), where the TPU driver may run.

# Each argument as one shell word, joined by spaces: bare when it holds no special character,
# else in single quotes (POSIX, so a remote shell reads it as a local one would).
quote() {
  local word quoted=() escaped="'\\''"
  for word in "$@"; do
    if [[ $word =~ ^[-A-Za-z0-9_@%+=:,./]+$ ]]; then
      quoted+=("$word")
    else
      quoted+=("'${word//\'/$escaped}'")
    fi
  done
  printf '%s\n' "${quoted[*]}"
}

is_dry_run() {
  [ "${MCCKD_DRY_RUN:-0}" = 1 ]
}

# Prints a shell line prefixed by "+ ": the output itself in dry mode, a trace (stderr) otherwise.
show_line() {
  if is_dry_run; then
    printf '+ %s\n' "$1"
  else
    printf '+ %s\n' "$1" >&2
  fi
}

# Shows a command, then runs it unless in dry mode.
run() {
  show_line "$(quote "$@")"
  is_dry_run || "$@"
}

# Shows a command, then replaces this shell with it (dry mode: exits 0 instead).
run_in_place() {
  show_line "$(quote "$@")"
  if is_dry_run; then
    exit 0
  fi
  exec "$@"
}

# One line on stderr (the problem, then the script's $USAGE) and exit status 2.
usage_error() {
  printf '%s: %s (usage: %s)\n' "${SCRIPT_NAME:-${0##*/}}" "$1" "${USAGE:-}" >&2
  exit 2
}

is_count() {
  [[ $1 =~ ^[1-9][0-9]*$ ]]
}

# Whether COMMAND ARGS... needs mesh.across_hosts set to the process count: mcckd-train and
# mcckd-eval do (on GPU and CPU every process is a granule of the mesh, sharding.make_mesh);
# mcckd-teacher has no mesh.* field (its mesh spans every device of every process), other
# commands are not ours to change, and a mesh.across_hosts the user gave stays as given.
needs_mesh_override() {
  local arg
  case ${1##*/} in
    mcckd-train | mcckd-eval) ;;
    *) return 1 ;;
  esac
  shift
  for arg in "$@"; do
    case $arg in
      mesh.across_hosts=*) return 1 ;;
    esac
  done
  return 0
}
