#!/usr/bin/env bash
# Start training on every worker of a TPU VM at once, in the background.
#
# Each worker runs, from its checkout (see tpu_install.sh), detached with nohup:
#   python3 -m dit_jax.main --config=$CONFIG --workdir=$WORKDIR $EXTRA_FLAGS >> $LOG_FILE 2>&1
# On a pod slice every worker must run the same command: dit_jax.main calls
# jax.distributed.initialize(), which finds the other workers through the TPU metadata.
# Training resumes from the latest checkpoint in WORKDIR, so re-running this after a restart
# continues the run. A worker whose previous run is still alive (PID_FILE) refuses to start.
#
# Usage:
#   TPU_NAME=dit-xl PROJECT=my-proj ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#     WORKDIR=gs://my-bucket/runs/dit-xl-2 launch/tpu_train.sh
#
# Environment:
#   TPU_NAME          (required) name of the TPU VM
#   PROJECT, ZONE     (required) Google Cloud project and zone
#   ACCELERATOR_TYPE  (required) the TPU's type; a pod slice (size > 8) needs a gs:// WORKDIR
#   WORKDIR           (required) run directory: checkpoints, metrics, samples. Must be gs://
#                     on a pod slice (all workers write one checkpoint); single host: any path
#   CONFIG            config file and argument; default configs/imagenet256.py:variant=XL/2
#   EXTRA_FLAGS       extra flags for dit_jax.main, space separated, no spaces inside one
#                     flag (e.g. "--config.global_batch_size=512 --config.total_steps=400000")
#   REMOTE_ENV        environment for the training process, space separated NAME=VALUE
#                     words (e.g. "TF_CPP_MIN_LOG_LEVEL=1"); default none
#   REMOTE_DIR        checkout directory on the workers, relative to home; default dit_jax
#   LOG_FILE          log file on each worker, relative to home; default dit_jax_train.log
#   PID_FILE          pid file on each worker, relative to home; default dit_jax_train.pid
#   DRY_RUN=1         print the commands instead of running them
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
handle_args "$@"

require TPU_NAME ACCELERATOR_TYPE WORKDIR
gcloud_flags
CONFIG="${CONFIG:-configs/imagenet256.py:variant=XL/2}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"
REMOTE_ENV="${REMOTE_ENV:-}"
REMOTE_DIR="${REMOTE_DIR:-dit_jax}"
LOG_FILE="${LOG_FILE:-dit_jax_train.log}"
PID_FILE="${PID_FILE:-dit_jax_train.pid}"

if tpu_is_multi_host "${ACCELERATOR_TYPE}" && [[ "${WORKDIR}" != gs://* ]]; then
  die "WORKDIR='${WORKDIR}' must be a gs:// path on a multi-host TPU (ACCELERATOR_TYPE=${ACCELERATOR_TYPE}): every worker writes its shards of one checkpoint there"
fi

# Deliberately word-split: lists of flags / NAME=VALUE words.
# shellcheck disable=SC2206
extra=(${EXTRA_FLAGS})
# shellcheck disable=SC2206
env_words=(${REMOTE_ENV})
train=(python3 -m dit_jax.main "--config=${CONFIG}" "--workdir=${WORKDIR}"
       ${extra[@]+"${extra[@]}"})
if [[ ${#env_words[@]} -gt 0 ]]; then
  train=(env "${env_words[@]}" "${train[@]}")
fi

pid_file="\$HOME/$(quote_args "${PID_FILE}")"
log_file="\$HOME/$(quote_args "${LOG_FILE}")"
remote="if [ -f ${pid_file} ] && kill -0 \"\$(cat ${pid_file})\" 2>/dev/null;"
remote+=" then echo \"training already running (pid \$(cat ${pid_file}))\" >&2; exit 1; fi;"
remote+=" cd $(quote_args "${REMOTE_DIR}") || exit 1;"
remote+=" nohup $(quote_args "${train[@]}") >> ${log_file} 2>&1 < /dev/null &"
remote+=" echo \$! > ${pid_file}"

run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --worker=all "${GCLOUD_FLAGS[@]}" \
  --command="${remote}"
