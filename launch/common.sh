# shellcheck shell=bash
# Shared helpers for the launch/ scripts; sourced, never executed.
#
# Owns: the dry-run machinery (`run`), required-variable checks (`require`), the gcloud
# flags every TPU command shares, and the facts about TPU accelerator types the scripts
# need (single host or pod slice, default runtime version).
#
# Environment read here (every script):
#   DRY_RUN=1   print each command, one per line prefixed by "+ ", instead of running it.
#               The printed lines are shell-quoted (like Python's shlex.quote), so each one
#               can be pasted into a shell as is.
#   PROJECT, ZONE   Google Cloud project and zone (TPU scripts only; no defaults, on purpose:
#               a default project is how runs land in the wrong billing account).

LAUNCH_DIR="${LAUNCH_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
REPO_ROOT="${REPO_ROOT:-$(cd "${LAUNCH_DIR}/.." && pwd)}"
SCRIPT_NAME="$(basename "$0")"

die() {
  echo "${SCRIPT_NAME}: error: $*" >&2
  exit 1
}

log() {
  echo "${SCRIPT_NAME} $(date -u +%Y-%m-%dT%H:%M:%SZ): $*" >&2
}

is_dry_run() {
  [[ "${DRY_RUN:-0}" == "1" ]]
}

# Print the usage header (the leading comment block of the calling script) on -h/--help;
# refuse any other argument: the scripts are configured by environment variables only.
handle_args() {
  if [[ $# -gt 0 ]]; then
    if [[ "$1" == "-h" || "$1" == "--help" ]]; then
      sed -n '2,/^[^#]/{/^#SBATCH/q;/^#/!q;s/^# \{0,1\}//;p}' "$0"
      exit 0
    fi
    die "takes no arguments (got '$*'); configure it with environment variables, see --help"
  fi
}

# require VAR...: fail, naming the variable, when one is unset or empty.
require() {
  local var
  for var in "$@"; do
    if [[ -z "${!var:-}" ]]; then
      die "required environment variable ${var} is not set (see '${SCRIPT_NAME} --help')"
    fi
  done
}

# Validate a 0/1 flag variable; prints nothing.
require_bool() {
  local var="$1"
  case "${!var:-0}" in
    0|1) ;;
    *) die "${var} must be 0 or 1, got '${!var}'" ;;
  esac
}

# Shell-quote each argument (the same safe set as Python's shlex.quote) and join by spaces.
quote_args() {
  local out=() a q="'\\''"
  for a in "$@"; do
    if [[ -n "$a" && "$a" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("$a")
    else
      out+=("'${a//\'/"$q"}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

# run CMD ARGS...: with DRY_RUN=1 print "+ CMD ARGS" to stdout; otherwise echo it to
# stderr (a log of what ran) and run it. Builtins work too (`run export X=1`, `run cd D`).
run() {
  if is_dry_run; then
    echo "+ $(quote_args "$@")"
  else
    echo "+ $(quote_args "$@")" >&2
    "$@"
  fi
}

# Flags shared by every `gcloud compute tpus ...` command, as an array: "${GCLOUD_FLAGS[@]}".
gcloud_flags() {
  require ZONE PROJECT
  GCLOUD_FLAGS=("--zone=${ZONE}" "--project=${PROJECT}")
}

# The number after the dash of an accelerator type: v4-32 -> 32, v5litepod-8 -> 8.
tpu_size() {
  local accel="$1"
  if [[ ! "$accel" =~ ^v[0-9]+[a-z]*-([0-9]+)$ ]]; then
    die "ACCELERATOR_TYPE='${accel}' is not of the form v<gen>[<kind>]-<size> (e.g. v4-8, v5litepod-8, v5p-64, v6e-16)"
  fi
  echo "${BASH_REMATCH[1]}"
}

# Whether a TPU slice spans several hosts (TPU VM workers). Every generation's single-host
# slices have size <= 8 (v2-8, v3-8, v4-8, v5p-8, v5litepod-1/4/8, v6e-1/4/8); every larger
# slice (v4-16, v4-32, v5p-64, v5litepod-16, ...) is a pod slice with one worker per host.
tpu_is_multi_host() {
  local size
  size="$(tpu_size "$1")" || exit 1
  (( size > 8 ))
}

# Number of TPU VM workers (hosts) of an accelerator type. v2/v3/v4/v5p sizes count TensorCores,
# 8 per host (v4-32: 4 hosts); v5e/v6e sizes count chips: single-host slices have up to 8 chips,
# multi-host slices 4 chips per host (v5litepod-16: 4 hosts, v6e-256: 64 hosts).
tpu_num_hosts() {
  local size
  size="$(tpu_size "$1")" || exit 1
  if (( size <= 8 )); then
    echo 1
  elif [[ "$1" =~ ^v(5litepod|5e|6e)- ]]; then
    echo $(( size / 4 ))
  else
    echo $(( size / 8 ))
  fi
}

# The version setup.py pins for a package (`pinned_version jax` -> 0.10.2): the launch scripts
# install exactly the tested stack, so `jax[tpu]` never pulls another jax than the pins.
pinned_version() {
  local v
  v="$(sed -n "s/^ *\"$1==\([^\"]*\)\",*\$/\1/p" "${REPO_ROOT}/setup.py" | head -n 1)"
  [[ -n "$v" ]] || die "setup.py pins no version of $1"
  echo "$v"
}

# Default TPU VM software version ("runtime version") for an accelerator type.
tpu_default_runtime_version() {
  case "$1" in
    v2-*|v3-*|v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "no default RUNTIME_VERSION for ACCELERATOR_TYPE='$1'; set RUNTIME_VERSION" ;;
  esac
}
