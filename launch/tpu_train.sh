#!/usr/bin/env bash
# Start training on every worker of a TPU VM at once, in the background, after the one-time
# data step on worker 0.
#
# 1. Data (PREPARE=1, on worker 0 only, in the foreground; nothing starts if it fails):
#      ~/dit_jax_venv/bin/python -m dit_jax.prepare --config=$CONFIG $EXTRA_FLAGS
#    builds the config's tfds data set (ImageNet from config.data.manual_dir into
#    config.data.data_dir, which must be gs:// on a pod slice) once, so that the training
#    workers only read it; a no-op when it is already prepared. With EXTRACT=1 it is followed
#    by `python -m dit_jax.extract $EXTRACT_FLAGS` on every worker (the cached VAE latents;
#    each worker encodes its share), when the installed tree has dit_jax/extract.py; then
#    train with --config.data.latent_cache_dir=<its --out>.
# 2. Training, on every worker, detached with nohup:
#      ~/dit_jax_venv/bin/python -m dit_jax.main --config=$CONFIG --workdir=$WORKDIR \
#          [--distributed=auto] $EXTRA_FLAGS >> $LOG_FILE 2>&1
#    `--distributed=auto` is passed for multi-host accelerator types (v4-16 and larger,
#    v5p-16+, v5litepod-16+, v6e-16+): every worker calls jax.distributed.initialize(), which
#    finds the others through the TPU metadata. Single-host types (size <= 8) do not pass it.
#    The worker records the process id in PID_FILE and, when the process ends, its exit
#    status in EXIT_FILE (tpu_watch.sh reads both). A worker whose previous run is still
#    alive refuses to start. Training resumes from the latest checkpoint in WORKDIR.
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
#   EXTRA_FLAGS       extra flags for dit_jax.main (and the data step), space separated, no
#                     spaces inside one flag (e.g. "--config.global_batch_size=512")
#   PREPARE           1: run the one-time data step on worker 0 first; default 1
#   EXTRACT           1: then run dit_jax.extract (the latent cache) on every worker; default 0
#   EXTRACT_FLAGS     dit_jax.extract's flags, space separated (e.g. "--data imagenet2012
#                     --data-dir gs://b/tfds --image-size 256 --vae-dir sd-vae-ft-ema
#                     --out /mnt/disks/latents")
#   REMOTE_ENV        environment for the training process, space separated NAME=VALUE
#                     words (e.g. "TF_CPP_MIN_LOG_LEVEL=1"); default none
#   REMOTE_DIR        checkout directory on the workers, relative to home; default dit_jax
#   REMOTE_VENV       virtual environment (tpu_install.sh), relative to home; default dit_jax_venv
#   LOG_FILE          log file on each worker, relative to home; default dit_jax_train.log
#   PID_FILE          pid file on each worker, relative to home; default dit_jax_train.pid
#   EXIT_FILE         exit status file on each worker, relative to home; default dit_jax_train.exit
#   DRY_RUN=1         print the commands instead of running them
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
handle_args "$@"

require TPU_NAME ACCELERATOR_TYPE WORKDIR
gcloud_flags
CONFIG="${CONFIG:-configs/imagenet256.py:variant=XL/2}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"
PREPARE="${PREPARE:-1}"
EXTRACT="${EXTRACT:-0}"
EXTRACT_FLAGS="${EXTRACT_FLAGS:-}"
REMOTE_ENV="${REMOTE_ENV:-}"
REMOTE_DIR="${REMOTE_DIR:-dit_jax}"
REMOTE_VENV="${REMOTE_VENV:-dit_jax_venv}"
LOG_FILE="${LOG_FILE:-dit_jax_train.log}"
PID_FILE="${PID_FILE:-dit_jax_train.pid}"
EXIT_FILE="${EXIT_FILE:-dit_jax_train.exit}"
require_bool PREPARE
require_bool EXTRACT
if [[ "${EXTRACT}" == 1 && -z "${EXTRACT_FLAGS}" ]]; then
  die "EXTRACT=1 needs EXTRACT_FLAGS (dit_jax.extract's --data, --image-size, --vae-dir, --out, ...)"
fi

hosts="$(tpu_num_hosts "${ACCELERATOR_TYPE}")"
if (( hosts > 1 )) && [[ "${WORKDIR}" != gs://* ]]; then
  die "WORKDIR='${WORKDIR}' must be a gs:// path on a multi-host TPU (ACCELERATOR_TYPE=${ACCELERATOR_TYPE}): every worker writes its shards of one checkpoint there"
fi

# Deliberately word-split: lists of flags / NAME=VALUE words.
# shellcheck disable=SC2206
extra=(${EXTRA_FLAGS})
# shellcheck disable=SC2206
extract_extra=(${EXTRACT_FLAGS})
# shellcheck disable=SC2206
env_words=(${REMOTE_ENV})
python="\$HOME/$(quote_args "${REMOTE_VENV}")/bin/python"
env_prefix=""
if [[ ${#env_words[@]} -gt 0 ]]; then
  env_prefix="env $(quote_args "${env_words[@]}") "
fi
train=(-m dit_jax.main "--config=${CONFIG}" "--workdir=${WORKDIR}")
if (( hosts > 1 )); then
  log "${ACCELERATOR_TYPE} has ${hosts} hosts: --distributed=auto (jax.distributed.initialize on every worker)"
  train+=(--distributed=auto)
fi
train+=(${extra[@]+"${extra[@]}"})

if [[ "${PREPARE}" == 1 ]]; then
  data="cd $(quote_args "${REMOTE_DIR}") && ${env_prefix}${python} $(quote_args -m dit_jax.prepare \
"--config=${CONFIG}" ${extra[@]+"${extra[@]}"})"
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --worker=0 "${GCLOUD_FLAGS[@]}" \
    --command="${data}"
fi
if [[ "${EXTRACT}" == 1 ]]; then
  # Every worker encodes its share and writes its own shards (dit_jax.extract's design).
  extract="cd $(quote_args "${REMOTE_DIR}") && if [ -f dit_jax/extract.py ]; then"
  extract+=" ${env_prefix}${python} $(quote_args -m dit_jax.extract \
${extract_extra[@]+"${extract_extra[@]}"}); else echo 'dit_jax.extract is not installed: no latent cache' >&2; fi"
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --worker=all "${GCLOUD_FLAGS[@]}" \
    --command="${extract}"
fi

pid_file="\$HOME/$(quote_args "${PID_FILE}")"
exit_file="\$HOME/$(quote_args "${EXIT_FILE}")"
log_file="\$HOME/$(quote_args "${LOG_FILE}")"
# The inner shell keeps the python's pid in PID_FILE and writes its exit status when it ends.
inner="${env_prefix}${python} $(quote_args "${train[@]}") & echo \$! > ${pid_file};"
inner+=" wait \$!; echo \$? > ${exit_file}"
remote="if [ -f ${pid_file} ] && kill -0 \"\$(cat ${pid_file})\" 2>/dev/null;"
remote+=" then echo \"training already running (pid \$(cat ${pid_file}))\" >&2; exit 1; fi;"
remote+=" cd $(quote_args "${REMOTE_DIR}") || exit 1; rm -f ${exit_file};"
remote+=" nohup bash -c $(quote_args "${inner}") >> ${log_file} 2>&1 < /dev/null &"
remote+=" sleep 1"

run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --worker=all "${GCLOUD_FLAGS[@]}" \
  --command="${remote}"
