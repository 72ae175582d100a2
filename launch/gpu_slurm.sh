#!/usr/bin/env bash
# Slurm batch script: multi-node GPU training, one process per node owning all its GPUs.
#
# Submit it with launch/gpu_submit.sh (which sets nodes, GPUs and partition and passes
# CONFIG/WORKDIR), or directly: `CONFIG=... WORKDIR=... sbatch --nodes=4 launch/gpu_slurm.sh`
# from the repository root.
#
# Multi-process JAX: on several nodes dit_jax.main gets --distributed=auto and calls
# jax.distributed.initialize() with no arguments.
# Inside an `srun` step JAX detects Slurm from SLURM_JOB_ID, SLURM_STEP_NODELIST,
# SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID, and takes the process count and index from
# them. The coordinator address is exported here as JAX_COORDINATOR_ADDRESS (read by
# jax.distributed.initialize): the job's first node, on COORDINATOR_PORT (default: JAX's own
# choice, 61440 + SLURM_JOB_ID % 4096, so jobs sharing a node do not collide).
# JAX_LOCAL_DEVICE_IDS=0,...,GPUS_PER_NODE-1 is exported too: without it JAX's Slurm
# detection gives each process only GPU number SLURM_LOCALID (it assumes one task per GPU),
# and our one task per node would train on one GPU of each node.
#
# Environment (sbatch passes the submitting environment through):
#   WORKDIR           (required) run directory, on storage every node sees (shared file
#                     system or gs://); checkpoints resume from there
#   CONFIG            config file and argument; default configs/imagenet256.py:variant=XL/2
#   EXTRA_FLAGS       extra flags for dit_jax.main (and the data step), space separated
#   PREPARE           1: first run the one-time data step on one task,
#                     `srun --nodes=1 --ntasks=1 python -m dit_jax.prepare --config=$CONFIG
#                     $EXTRA_FLAGS` (builds the tfds set once; training then only reads);
#                     default 1
#   VENV              virtual environment to activate on every node, made by gpu_install.sh
#                     (Python >= 3.11, "jax[cuda12]==<the jax pin>", the imagenet and gcs
#                     extras); default none (the python on PATH, installed the same way)
#   PYTHON            python executable; default python
#   GPUS_PER_NODE     GPUs each process drives; default SLURM_GPUS_ON_NODE, else 8
#   NODES             nodes of the job when SLURM_JOB_NUM_NODES is unset (dry runs); default 2
#   COORDINATOR_PORT  port of the jax.distributed coordinator on the first node
#   REPO_ROOT         repository checkout on the shared file system; default the directory
#                     sbatch was run from (gpu_submit.sh sets it)
#   DRY_RUN=1         print the commands instead of running them (works outside Slurm:
#                     the head node prints as HEAD_NODE)
#SBATCH --job-name=dit_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
set -euo pipefail

# Slurm runs a copy of this file from its spool directory: find launch/ via REPO_ROOT or
# the submit directory when common.sh is not next to this copy.
_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -f "${_here}/common.sh" ]]; then
  LAUNCH_DIR="${_here}"
else
  REPO_ROOT="${REPO_ROOT:-${SLURM_SUBMIT_DIR:-${PWD}}}"
  LAUNCH_DIR="${REPO_ROOT}/launch"
fi
source "${LAUNCH_DIR}/common.sh"
handle_args "$@"

require WORKDIR
CONFIG="${CONFIG:-configs/imagenet256.py:variant=XL/2}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"
PYTHON="${PYTHON:-python}"
PREPARE="${PREPARE:-1}"
require_bool PREPARE
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
if [[ ! "${GPUS_PER_NODE}" =~ ^[1-9][0-9]*$ ]]; then
  die "GPUS_PER_NODE must be a positive integer, got '${GPUS_PER_NODE}'"
fi

# First host of a Slurm node list ("gpu[003-004,9],cpu1" -> gpu003), as JAX parses it;
# scontrol when available.
first_node() {
  local list="$1"
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "${list}" | head -n 1
    return
  fi
  local prefix="${list%%[,\[]*}"
  if [[ "${list:${#prefix}:1}" == "[" ]]; then
    local rest="${list#*\[}"
    echo "${prefix}${rest%%[-,\]]*}"
  else
    echo "${prefix}"
  fi
}

if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
  head_node="$(first_node "${SLURM_JOB_NODELIST}")"
elif is_dry_run; then
  head_node="HEAD_NODE"
else
  die "SLURM_JOB_NODELIST is not set: run this script with sbatch (or DRY_RUN=1)"
fi
if [[ -z "${COORDINATOR_PORT:-}" ]]; then
  COORDINATOR_PORT=$(( ${SLURM_JOB_ID:-0} % 4096 + 61440 ))
fi

nodes="${SLURM_JOB_NUM_NODES:-${NODES:-2}}"
main_flags=("--config=${CONFIG}" "--workdir=${WORKDIR}")
(( nodes > 1 )) && main_flags+=(--distributed=auto)
# Deliberately word-split: a list of flags.
# shellcheck disable=SC2206
extra=(${EXTRA_FLAGS})
if [[ -n "${VENV:-}" ]]; then
  if is_dry_run; then
    run source "${VENV}/bin/activate"
  else
    log "activating ${VENV}"
    # shellcheck disable=SC1091
    source "${VENV}/bin/activate"
  fi
fi
run cd "${REPO_ROOT}"
run export "JAX_COORDINATOR_ADDRESS=${head_node}:${COORDINATOR_PORT}"
run export "JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS_PER_NODE - 1)))"
if [[ "${PREPARE}" == 1 ]]; then
  run srun --nodes=1 --ntasks=1 "${PYTHON}" -m dit_jax.prepare "--config=${CONFIG}" \
    ${extra[@]+"${extra[@]}"}
fi
run srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
  "${PYTHON}" -m dit_jax.main "${main_flags[@]}" \
  ${extra[@]+"${extra[@]}"}
