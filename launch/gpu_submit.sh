#!/usr/bin/env bash
# Submit multi-node GPU training to Slurm: sbatch launch/gpu_slurm.sh with the job shape
# and run settings taken from the environment.
#
# Usage:
#   NODES=4 GPUS_PER_NODE=8 PARTITION=gpu WORKDIR=/shared/runs/dit-xl-2 launch/gpu_submit.sh
#   DRY_RUN=1 ... launch/gpu_submit.sh   # print the sbatch command and the job's srun command
#
# Environment:
#   WORKDIR           (required) run directory on storage every node sees (or gs://)
#   NODES             number of nodes; default 1
#   GPUS_PER_NODE     GPUs per node; default 8
#   PARTITION         Slurm partition; default: the cluster's default partition
#   TIME_LIMIT        sbatch --time (e.g. 2-00:00:00); default: the partition's limit
#   JOB_NAME          job name; default dit_jax
#   CONFIG            config file and argument; default configs/imagenet256.py:variant=XL/2
#   EXTRA_FLAGS       extra flags for dit_jax.main, space separated
#   SBATCH_FLAGS      extra sbatch flags, space separated (e.g. "--account=abc --qos=high")
#   VENV, PYTHON, COORDINATOR_PORT   passed to gpu_slurm.sh (see there)
#   DRY_RUN=1         print the commands instead of running them
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
handle_args "$@"

require WORKDIR
NODES="${NODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
JOB_NAME="${JOB_NAME:-dit_jax}"
CONFIG="${CONFIG:-configs/imagenet256.py:variant=XL/2}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"
for var in NODES GPUS_PER_NODE; do
  if [[ ! "${!var}" =~ ^[1-9][0-9]*$ ]]; then
    die "${var} must be a positive integer, got '${!var}'"
  fi
done
if (( NODES > 1 )) && [[ "${WORKDIR}" != /* && "${WORKDIR}" != gs://* ]]; then
  die "WORKDIR='${WORKDIR}' must be an absolute shared path or gs:// when NODES=${NODES} > 1"
fi

sbatch_args=("--job-name=${JOB_NAME}" "--nodes=${NODES}" --ntasks-per-node=1
             "--gpus-per-node=${GPUS_PER_NODE}" "--chdir=${REPO_ROOT}")
[[ -n "${PARTITION:-}" ]] && sbatch_args+=("--partition=${PARTITION}")
[[ -n "${TIME_LIMIT:-}" ]] && sbatch_args+=("--time=${TIME_LIMIT}")
# Deliberately word-split: a list of flags.
# shellcheck disable=SC2206
sbatch_args+=(${SBATCH_FLAGS:-})

# sbatch exports the submitting environment (--export=ALL, its default); `env` makes the
# run settings explicit in the command (and in the dry-run line).
job_env=("CONFIG=${CONFIG}" "WORKDIR=${WORKDIR}" "EXTRA_FLAGS=${EXTRA_FLAGS}"
         "GPUS_PER_NODE=${GPUS_PER_NODE}" "REPO_ROOT=${REPO_ROOT}")
run env "${job_env[@]}" sbatch "${sbatch_args[@]}" "${LAUNCH_DIR}/gpu_slurm.sh"
if is_dry_run; then
  # What the job will run once it starts (head node unknown until then).
  env "NODES=${NODES}" "${job_env[@]}" "${LAUNCH_DIR}/gpu_slurm.sh"
fi
